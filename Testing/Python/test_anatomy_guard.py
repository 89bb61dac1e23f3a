"""The anatomy guard in the engine, the CLI and the summary: anatomy that is not in the scan.

The demo weights find nothing in the crops and the synthetic head used here, so the guard's own
rules are exercised with a fault injected at the logits: the network is made to claim one
structure everywhere, as the demo weights claimed a 232 mL liver in a real head CT. The real,
uninjected demo model is run too, to check the whole path on crops of the bundled CT.
"""

from __future__ import annotations

import json

import pytest

from MoMESegmentationLib.cli import _print_table, main
from MoMESegmentationLib.data.sample import load_sample_ct, sample_mr_path
from MoMESegmentationLib.engine import Segmenter
from MoMESegmentationLib.errors import InputError
from MoMESegmentationLib.io.readers import read_volume
from test_anatomy import LUNG_LABELS, crop_slices, reference_area_cm2, slice_z, synthetic_head

#: Logit that the injected network gives the claimed structure (probability ~0.9997).
CLAIM = 8.0


@pytest.fixture(scope="module")
def demo():
    return Segmenter("demo", device="cpu")


@pytest.fixture(scope="module")
def case():
    return load_sample_ct()


@pytest.fixture(scope="module")
def pelvis(case):
    z = slice_z(case.image)
    kidney_bottom = z[reference_area_cm2(case, ("kidney_left", "kidney_right")) > 0].min()
    return crop_slices(case.image, z <= kidney_bottom - 40.0)


@pytest.fixture(scope="module")
def chest(case):
    return crop_slices(case.image, reference_area_cm2(case, LUNG_LABELS) >= 5.0)


@pytest.fixture(scope="module")
def head():
    return synthetic_head()


@pytest.fixture
def claims_first_prompt_everywhere(demo, monkeypatch):
    """Fault injection: the network's logits for the first prompt are CLAIM in every voxel."""
    decode = demo.model.decode

    def confident(features, embeddings, *args, **kwargs):
        logits = decode(features, embeddings, *args, **kwargs)
        logits[:, 0] = CLAIM
        return logits

    monkeypatch.setattr(demo.model, "decode", confident)
    demo.clear_cache()
    yield
    demo.clear_cache()


def by_id(result, structure_id):
    return next(s for s in result.structures if s.id == structure_id)


@pytest.mark.parametrize("scan, prompts, claimed, shown", [
    ("head", "liver, spleen", "liver", "head"),
    ("pelvis", "liver, urinary bladder", "liver", "pelvis"),
    ("chest", "urinary bladder, liver", "urinary_bladder", "chest"),
])
def test_a_confident_mask_outside_the_field_of_view_is_not_found(
        scan, prompts, claimed, shown, request, demo, claims_first_prompt_everywhere):
    volume = request.getfixturevalue(scan)
    result = demo.segment(volume, prompts, fast=True)
    claim = by_id(result, claimed)
    assert not claim.found and claim.rule == "region", claim
    assert shown in claim.note and claim.name.lower() in claim.note.lower()
    assert claim.mean_probability > 0.99  # the network was confident: only the guard says no
    assert not result.masks[0].any() and not (result.labelmap == claim.label).any()
    summary = json.loads(json.dumps(result.summary()))
    assert summary["anatomy_guard"] is True
    assert shown in summary["coverage"]["regions"]
    entry = next(s for s in summary["structures"] if s["id"] == claimed)
    assert entry["found"] is False and entry["rule"] == "region" and entry["note"] == claim.note

    # The same run without the guard keeps the mask: it is the guard that refused it.
    unguarded = demo.segment(volume, prompts, fast=True, anatomy_guard=False)
    assert by_id(unguarded, claimed).found and unguarded.masks[0].any()
    assert unguarded.coverage is None and unguarded.summary()["anatomy_guard"] is False


def test_the_guard_keeps_structures_that_belong(demo, case, claims_first_prompt_everywhere):
    """A claimed bladder in the pelvis is not refused for its region (the volume rule may fire)."""
    z = slice_z(case.image)
    pelvis = crop_slices(case.image, z <= z.min() + 60.0)  # 60 mm of true pelvis: a plausible bladder size
    result = demo.segment(pelvis, "urinary bladder", fast=True)
    assert result.structures[0].rule not in ("region", "position"), result.structures[0]


def test_real_demo_weights_on_crops(demo, pelvis, chest):
    """Without injection: what the crop lacks is not found, what it holds is found."""
    demo.clear_cache()
    result = demo.segment(pelvis, "liver, urinary bladder", fast=True)
    assert not by_id(result, "liver").found and by_id(result, "liver").note
    assert by_id(result, "urinary_bladder").found
    result = demo.segment(chest, "urinary bladder, liver", fast=True)
    assert not by_id(result, "urinary_bladder").found and by_id(result, "urinary_bladder").note
    assert by_id(result, "liver").found


def test_mr_is_refused_as_not_ct(demo):
    mr = read_volume(sample_mr_path())
    with pytest.raises(InputError, match="do not look like CT.*anatomy guard"):
        demo.segment(mr, "liver")


def test_cli_refuses_mr_in_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "mr_labels.nii.gz"
    code = main(["segment", str(sample_mr_path()), "--prompt", "liver", "-o", str(out), "--device", "cpu",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and not list(tmp_path.iterdir())
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "example_mr_sm" in lines[0] and "anatomy guard" in lines[0], err

    code = main(["segment", str(sample_mr_path()), "--prompt", "liver", "-o", str(out), "--device", "cpu",
                 "--fast", "--quiet", "--no-anatomy-guard"])
    captured = capsys.readouterr()
    assert code == 0 and out.exists(), captured.err
    assert "do not look like CT" in captured.err  # still warned
    summary = json.loads(out.with_name("mr_labels.json").read_text())
    assert summary["anatomy_guard"] is False


def test_cli_table_names_the_rule():
    import io

    from MoMESegmentationLib.engine import StructureResult

    rows = [StructureResult(1, "liver", "liver", "Liver", "liver", 1.0, False, (1, 2, 3), None, 0.0, 0.91, 0,
                            note="scan covers head only; liver lies in the chest and abdomen", rule="region"),
            StructureResult(2, "spleen", "spleen", "Spleen", "spleen", 1.0, True, (1, 2, 3), None, 120.0, 0.9, 10)]
    stream = io.StringIO()
    _print_table(rows, stream=stream)
    lines = stream.getvalue().splitlines()
    assert "[region] scan covers head only" in lines[2]
    assert "[" not in lines[3]

