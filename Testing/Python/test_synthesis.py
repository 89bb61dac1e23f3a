"""CT synthesised from label maps (MoMESegmentationLib.data.synthesis), on the bundled label maps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from MoMESegmentationLib.data.phantoms import _T, make_phantom
from MoMESegmentationLib.data.sample import load_sample_ct, load_sample_mr_labels
from MoMESegmentationLib.data.synthesis import deform_labels, synthesize_ct, tissue_of


@pytest.fixture(scope="module")
def case():
    return load_sample_ct()


def value_of(table, name):
    return next(v for v, n in table.items() if n == name)


def centroid_lps(volume, mask):
    return volume.index_to_physical(np.argwhere(mask).mean(axis=0))


def test_tissue_rules():
    assert tissue_of("liver") == _T.LIVER
    assert tissue_of("kidney_left") == _T.KIDNEY_CORTEX
    assert tissue_of("vertebrae_L1") == tissue_of("rib_left_7") == tissue_of("sacrum") == _T.BONE
    assert tissue_of("iliac_artery_left") == tissue_of("aorta") == _T.ARTERY
    assert tissue_of("portal_vein_and_splenic_vein") == _T.PORTAL
    assert tissue_of("inferior_vena_cava") == tissue_of("iliac_vena_right") == _T.VEIN
    assert tissue_of("lung_lower_lobe_left") == _T.LUNG
    assert tissue_of("autochthon_left") == tissue_of("something_new") == _T.MUSCLE


def test_same_seed_same_scan_other_seed_other_scan(case):
    a = synthesize_ct(case.labels, case.label_table, seed=4)
    b = synthesize_ct(case.labels, case.label_table, seed=4)
    c = synthesize_ct(case.labels, case.label_table, seed=5)
    np.testing.assert_array_equal(a.image.array, b.image.array)
    np.testing.assert_array_equal(a.labels.array, b.labels.array)
    assert not np.array_equal(a.labels.array, c.labels.array)
    assert np.abs(a.image.array - c.image.array).mean() > 5


def test_scan_lies_on_the_label_maps_grid(case):
    scan = synthesize_ct(case.labels, case.label_table, seed=1)
    assert scan.image.same_grid(case.labels) and scan.labels.same_grid(case.labels)
    assert scan.image.array.dtype == np.float32
    assert -1024 <= scan.image.array.min() and scan.image.array.max() <= 3071


@pytest.mark.parametrize("seed", range(4))
def test_tissues_get_physical_hounsfield_units(case, seed):
    scan = synthesize_ct(case.labels, case.label_table, seed=seed)
    image, labels = scan.image.array, scan.labels.array
    table = case.label_table

    def median(name):
        return float(np.median(image[labels == value_of(table, name)]))

    assert 15 <= median("liver") <= 200
    assert 15 <= median("spleen") <= 200
    assert median("vertebrae_L3") > 150
    cortex = np.percentile(image[labels == value_of(table, "vertebrae_L3")], 95)
    assert cortex > 350, "bones have a dense cortical rim"
    assert -30 <= median("urinary_bladder") <= 60  # urine: water
    assert median("aorta") > median("urinary_bladder")
    corner = image[:5, :5, :5]
    assert np.median(corner) < -900, "outside the body is air"
    body = labels == 0
    assert (image[body] > -200).mean() > 0.2, "unlabelled anatomy is painted as body, not air"


def test_lungs_of_a_phantom_label_map_are_air_filled():
    phantom = make_phantom(3, shape=(48, 48, 64), spacing=(6.0, 6.0, 6.0), random_orientation=False)
    scan = synthesize_ct(phantom.labels, phantom.label_table, seed=0)
    lung = np.isin(scan.labels.array, [value_of(phantom.label_table, n)
                                       for n in ("lung_lower_lobe_left", "lung_lower_lobe_right")])
    if lung.sum() > 50:
        assert np.median(scan.image.array[lung]) < -600


def test_a_second_patients_mr_label_map_gives_a_ct(case):
    labels, table = load_sample_mr_labels()
    scan = synthesize_ct(labels, table, seed=2)
    liver = scan.labels.array == value_of(table, "liver")
    assert liver.sum() > 5000
    assert 15 <= np.median(scan.image.array[liver]) <= 200


def test_identity_deformation_keeps_the_labels(case):
    rng = np.random.default_rng(0)
    out = deform_labels(case.labels.array, case.labels.spacing, rng, max_rotation_deg=0.0, scale_range=(1.0, 1.0),
                        max_displacement_mm=0.0)
    np.testing.assert_array_equal(out, case.labels.array)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_deformation_keeps_left_and_right(case, seed):
    """Never a mirror: the left kidney stays on the patient's left of the right one (LPS +x = left)."""
    rng = np.random.default_rng(seed)
    out = deform_labels(case.labels.array, case.labels.spacing, rng)
    left = out == value_of(case.label_table, "kidney_left")
    right = out == value_of(case.label_table, "kidney_right")
    assert left.sum() > 1000 and right.sum() > 1000
    assert centroid_lps(case.labels, left)[0] > centroid_lps(case.labels, right)[0] + 40
    # the organs move, but stay where they were give or take the affine's reach
    before = centroid_lps(case.labels, case.labels.array == value_of(case.label_table, "liver"))
    after = centroid_lps(case.labels, out == value_of(case.label_table, "liver"))
    assert np.linalg.norm(after - before) < 60


# ----------------------------------------------------------------------------- training source


def test_synth_source_gives_training_items_from_each_label_map():
    from MoMESegmentationLib.training.config import DatasetSpec, TransformConfig
    from MoMESegmentationLib.training.datasets import SynthSource, synth_label_names

    spec = DatasetSpec(kind="synth", name="synth", n=3, seed=0, label_maps=["sample_ct", "sample_mr", "phantoms"])
    structures = ["liver", "spleen", "urinary_bladder"]
    source = SynthSource(spec, structures, {}, TransformConfig(spacing=[6.0, 6.0, 6.0], patch_size=[32, 32, 32]))
    assert len(source) == 3
    for index in range(3):
        item = source.case(index)
        label = np.asarray(item["label"])
        assert item["image"].shape == label.shape and label.ndim == 4
        liver = item["structure_values"]["liver"]
        assert np.isin(label, liver).sum() > 50, f"scan {index}: no liver"
        assert set(item["structure_values"]) == set(structures)
    # the MR slab's table names the bladder, which the slab does not hold: a true negative
    mr = source.case(1)
    assert not np.isin(np.asarray(mr["label"]), mr["structure_values"]["urinary_bladder"]).any()
    assert {"liver", "vertebrae", "kidney_left", "aorta"} <= synth_label_names(spec)


def test_synth_config_names_its_label_maps(tmp_path):
    from MoMESegmentationLib.errors import MoMEError
    from MoMESegmentationLib.training.config import config_from_dict

    raw = {"data": {"datasets": [{"kind": "synth", "n": 2, "label_maps": ["sample_ct", "somewhere"]}]}}
    with pytest.raises(MoMEError, match="somewhere"):
        config_from_dict(raw).validate()
    raw["data"]["datasets"][0]["label_maps"] = ["sample_mr"]
    config_from_dict(raw).validate()
