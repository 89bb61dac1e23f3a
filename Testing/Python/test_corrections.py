"""Corrected segmentations become training cases: the writer, its manifest and ``mome corrections``.

Every case is written from a small phantom (a CT as ``.nrrd``, its labels as a Slicer ``.seg.nrrd``
with the structures' display names, as the Slicer module saves them) and read back through the
trainer's own manifest and case loaders. Faults are injected with monkeypatch only where a real
failure (a full disk, a rename refused by the file system) cannot be produced on demand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

phantoms = pytest.importorskip("MoMESegmentationLib.data.phantoms")

from MoMESegmentationLib import corrections  # noqa: E402
from MoMESegmentationLib.cli import main  # noqa: E402
from MoMESegmentationLib.corrections import add_correction_case, list_correction_cases, parse_labels  # noqa: E402
from MoMESegmentationLib.errors import InputError, MoMEError  # noqa: E402
from MoMESegmentationLib.io.readers import write_labelmap, write_volume  # noqa: E402
from MoMESegmentationLib.io.segmentation import Segment, Segmentation, write_segmentation  # noqa: E402
from MoMESegmentationLib.training.config import config_from_dict  # noqa: E402
from MoMESegmentationLib.training.datasets import dataset_records, load_case, manifest_records  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEGMENTS = {"liver": "Liver", "spleen": "Spleen", "kidney_left": "Left kidney", "kidney_right": "Right kidney"}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A phantom CT (.nrrd), its segmentation (.seg.nrrd, display names plus one unknown segment)
    and a label map of the same structures; ``masks`` are the true masks by structure id."""
    folder = tmp_path_factory.mktemp("case")
    p = phantoms.make_phantom(0, shape=(28, 28, 28), random_orientation=False, random_fov=False)
    labels = np.asarray(p.labels.array)
    value = {n: v for v, n in p.label_table.items()}
    masks = {structure: labels == value[structure] for structure in SEGMENTS}
    assert all(m.any() for m in masks.values())
    write_volume(p.image.with_array(np.round(p.image.array).astype(np.int16)), folder / "CT.nrrd")
    segments = [Segment(name, masks[s], (0.5, 0.5, 0.5), i) for i, (s, name) in enumerate(SEGMENTS.items(), 1)]
    segments.append(Segment("Tumour blob", masks["liver"] & (np.indices(labels.shape)[2] > 14), (1.0, 0, 0), 9))
    write_segmentation(Segmentation(p.labels, segments), folder / "CT.seg.nrrd")
    labelmap = np.zeros(labels.shape, np.uint8)
    labelmap[masks["liver"]], labelmap[masks["spleen"]] = 1, 2
    write_labelmap(labelmap, p.image, folder / "labels.nii.gz")
    return folder, p, masks


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _trainer_masks(record):
    """Structure id -> mask, for the vocabulary's structures the trainer reads from the case."""
    from MoMESegmentationLib.vocabulary import Vocabulary

    _, labels, values = load_case(record)
    known = set(Vocabulary.load().ids)
    return {s: np.isin(labels, [v for v, ids in values.items() if s in ids]) for s in
            {i for ids in values.values() for i in ids} if s in known}


def test_case_is_read_by_the_trainer(case, tmp_path):
    folder, _, masks = case
    dataset = tmp_path / "corrections"
    out = add_correction_case(dataset, folder / "CT.nrrd", folder / "CT.seg.nrrd",
                              {"Liver": "liver", "left KIDNEY": "kidney_left"}, case_id="pat-01", model="mome-demo")
    assert out == dataset / "pat-01"
    assert _files(dataset) == ["manifest.json", "pat-01", "pat-01/image.nrrd", "pat-01/segmentation.seg.nrrd"]
    document = json.loads((dataset / "manifest.json").read_text())
    assert document["format"] == "mome-corrections"
    entry, = document["cases"]
    assert entry["image"] == "pat-01/image.nrrd" and entry["label"] == "pat-01/segmentation.seg.nrrd"
    assert entry["source"] == "correction" and entry["model"] == "mome-demo" and entry["split"] == "train"
    assert entry["created"].endswith("Z") and len(entry["image_sha256"]) == 64
    # Segments the labels do not name are left out, even one named like a structure ("Spleen").
    assert entry["labels"] == {"Liver": "liver", "left KIDNEY": "kidney_left", "Spleen": [], "Right kidney": [],
                               "Tumour blob": []}
    assert entry["unused_segments"] == ["Spleen", "Right kidney", "Tumour blob"]

    raw = {"data": {"structures": ["liver", "kidney_left", "spleen"],
                    "datasets": [{"kind": "manifest", "name": "corrections", "manifest": str(dataset / "manifest.json")}]},
           "text": {"embeddings_cache": str(tmp_path / "unused.safetensors")}}
    (record, split), = manifest_records(config_from_dict(raw).data.datasets[0])
    assert (record.case_id, record.label_kind, split) == ("pat-01", "seg_nrrd", "train")
    got = _trainer_masks(record)
    assert set(got) == set(entry["structures"]) == {"liver", "kidney_left"}
    for structure in entry["structures"]:  # the liver keeps the voxels it shares with "Tumour blob"
        assert np.array_equal(got[structure], masks[structure]), structure
        assert entry["voxels"][structure] == int(masks[structure].sum())


def test_segment_names_resolved_through_the_vocabulary(case, tmp_path):
    folder, _, masks = case
    add_correction_case(tmp_path, folder / "CT.nrrd", folder / "CT.seg.nrrd", case_id="a", split="val")
    entry, = json.loads((tmp_path / "manifest.json").read_text())["cases"]
    assert entry["labels"] == {**{name: structure for structure, name in SEGMENTS.items()}, "Tumour blob": []}
    assert entry["unused_segments"] == ["Tumour blob"]
    spec = config_from_dict({"data": {"datasets": [{"kind": "manifest", "manifest": str(tmp_path / "manifest.json")}]},
                             "text": {"embeddings_cache": "x"}}).data.datasets[0]
    train, val, _ = dataset_records(spec, 0.0)
    assert [r.case_id for r in val] == ["a"]
    got = _trainer_masks(val[0])
    assert set(got) == set(SEGMENTS)
    assert all(np.array_equal(got[s], masks[s]) for s in SEGMENTS)


def test_overlapping_segments_keep_their_shared_voxels(case, tmp_path):
    """A tumour drawn inside the liver is both liver and tumour for the trainer; in a label map one
    of them would lose the shared voxels and be trained as absent there."""
    folder, p, masks = case
    k = np.indices(masks["liver"].shape)[2]
    tumour = masks["liver"] & (k > np.median(k[masks["liver"]]))
    assert 0 < tumour.sum() < masks["liver"].sum()
    segments = [Segment("Liver", masks["liver"], (1.0, 0, 0), 1), Segment("Liver tumor", tumour, (0, 1.0, 0), 2),
                Segment("Spleen", masks["spleen"], (0, 0, 1.0), 3)]
    write_segmentation(Segmentation(p.labels, segments), tmp_path / "overlap.seg.nrrd")
    add_correction_case(tmp_path / "c", folder / "CT.nrrd", tmp_path / "overlap.seg.nrrd",
                        {"Liver": "liver", "Liver tumor": "liver_tumor"})
    entry, = json.loads((tmp_path / "c" / "manifest.json").read_text())["cases"]
    assert entry["voxels"] == {"liver": int(masks["liver"].sum()), "liver_tumor": int(tumour.sum())}
    (record, _), = manifest_records(config_from_dict(
        {"data": {"datasets": [{"kind": "manifest", "manifest": str(tmp_path / "c" / "manifest.json")}]},
         "text": {"embeddings_cache": "x"}}).data.datasets[0])
    got = _trainer_masks(record)
    assert set(got) == {"liver", "liver_tumor"}  # "Spleen" is not in the labels: left out
    assert np.array_equal(got["liver"], masks["liver"]) and np.array_equal(got["liver_tumor"], tumour)


def test_label_map_case(case, tmp_path):
    folder, _, masks = case
    with pytest.raises(InputError, match="label map needs labels"):
        add_correction_case(tmp_path, folder / "CT.nrrd", folder / "labels.nii.gz")
    add_correction_case(tmp_path, folder / "CT.nrrd", folder / "labels.nii.gz", {1: "liver", "2": "spleen"})
    entry, = json.loads((tmp_path / "manifest.json").read_text())["cases"]
    assert entry["case_id"] == "CT" and entry["label"] == "CT/labels.nii.gz"
    assert entry["labels"] == {"1": "liver", "2": "spleen"}
    spec = config_from_dict({"data": {"datasets": [{"kind": "manifest", "manifest": str(tmp_path / "manifest.json")}]},
                             "text": {"embeddings_cache": "x"}}).data.datasets[0]
    (record, _), = manifest_records(spec)
    got = _trainer_masks(record)
    assert np.array_equal(got["liver"], masks["liver"]) and np.array_equal(got["spleen"], masks["spleen"])


@pytest.mark.parametrize("labels, message", [
    ({"Liver": "livr"}, "unknown structure id 'livr' (did you mean 'liver'?)"),
    ({"Liver": ["liver", "not_a_structure"]}, "unknown structure id 'not_a_structure'"),
    ({"Pancreas": "pancreas"}, "no segment named 'Pancreas'"),
    ({"Liver": 5}, "expected a structure id"),
])
def test_bad_labels_are_refused_before_writing(case, tmp_path, labels, message):
    folder, _, _ = case
    with pytest.raises(InputError) as caught:
        add_correction_case(tmp_path / "c", folder / "CT.nrrd", folder / "CT.seg.nrrd", labels)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "c").exists()


def test_missing_and_unusable_inputs(case, tmp_path):
    folder, _, _ = case
    dataset = tmp_path / "c"
    with pytest.raises(InputError, match="CT not found"):
        add_correction_case(dataset, folder / "nope.nrrd", folder / "CT.seg.nrrd")
    with pytest.raises(InputError, match="segmentation not found"):
        add_correction_case(dataset, folder / "CT.nrrd", folder / "nope.seg.nrrd")
    with pytest.raises(InputError, match="one file"):
        add_correction_case(dataset, folder, folder / "CT.seg.nrrd")
    with pytest.raises(InputError, match="case id"):
        add_correction_case(dataset, folder / "CT.nrrd", folder / "CT.seg.nrrd", case_id="../escape")
    assert not dataset.exists()


def test_segmentation_of_another_scan_is_refused(case, tmp_path):
    """A segmentation that does not overlap the CT would train the structures as absent; one that
    says a structure is absent is taken."""
    folder, p, masks = case
    far = p.labels.with_array(np.zeros(p.labels.shape, np.uint8))
    far.origin = far.origin + 1000.0
    write_segmentation(Segmentation(far, [Segment("Liver", masks["liver"], (1.0, 0, 0), 1)]), tmp_path / "far.seg.nrrd")
    with pytest.raises(InputError, match="no labelled voxel inside the CT"):
        add_correction_case(tmp_path / "c", folder / "CT.nrrd", tmp_path / "far.seg.nrrd")
    assert not (tmp_path / "c").exists()
    # A structure confirmed absent (an empty segment) is a valid correction: a negative example.
    write_segmentation(Segmentation(p.labels, [Segment("Gallbladder", np.zeros(p.labels.shape, bool), (0, 1.0, 0), 1)]),
                       tmp_path / "none.seg.nrrd")
    add_correction_case(tmp_path / "c", folder / "CT.nrrd", tmp_path / "none.seg.nrrd")
    assert list_correction_cases(tmp_path / "c")[0]["voxels"] == {"gallbladder": 0}


def test_existing_case_needs_overwrite(case, tmp_path):
    folder, _, _ = case
    add_correction_case(tmp_path, folder / "CT.nrrd", folder / "CT.seg.nrrd", {"Liver": "liver"}, case_id="x")
    manifest = (tmp_path / "manifest.json").read_bytes()
    with pytest.raises(InputError, match="case 'x' exists; pass overwrite"):
        add_correction_case(tmp_path, folder / "CT.nrrd", folder / "labels.nii.gz", {1: "liver"}, case_id="x")
    assert (tmp_path / "manifest.json").read_bytes() == manifest
    add_correction_case(tmp_path, folder / "CT.nrrd", folder / "labels.nii.gz", {1: "liver"}, case_id="x",
                        overwrite=True)
    entry, = json.loads((tmp_path / "manifest.json").read_text())["cases"]
    assert entry["label"] == "x/labels.nii.gz"
    assert _files(tmp_path) == ["manifest.json", "x", "x/image.nrrd", "x/labels.nii.gz"]
    add_correction_case(tmp_path, folder / "CT.nrrd", folder / "CT.seg.nrrd", case_id="y")
    assert [c["case_id"] for c in list_correction_cases(tmp_path)] == ["x", "y"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_failed_manifest_replace_leaves_the_folder_as_it_was(case, tmp_path, monkeypatch, overwrite):
    folder, _, _ = case
    add_correction_case(tmp_path, folder / "CT.nrrd", folder / "CT.seg.nrrd", {"Liver": "liver"}, case_id="x")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    real_replace = os.replace

    def refuse_manifest(src, dst):
        if os.fspath(dst).endswith("manifest.json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_manifest)
    with pytest.raises(MoMEError, match="No space left on device.*unchanged"):
        add_correction_case(tmp_path, folder / "CT.nrrd", folder / "labels.nii.gz", {1: "spleen"},
                            case_id="x" if overwrite else "y", overwrite=overwrite)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_failed_copy_leaves_nothing(case, tmp_path, monkeypatch):
    folder, _, _ = case
    calls = []

    def fail_second(fd):
        calls.append(fd)
        if len(calls) == 2:  # the segmentation's copy, after the CT's
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail_second)
    with pytest.raises(MoMEError, match="Input/output error"):
        add_correction_case(tmp_path, folder / "CT.nrrd", folder / "CT.seg.nrrd", case_id="x")
    assert _files(tmp_path) == []


def test_concurrent_writer_lock(case, tmp_path, monkeypatch):
    folder, _, _ = case
    lock = tmp_path / ".manifest.lock"
    lock.write_text("123")
    monkeypatch.setattr(corrections, "LOCK_TIMEOUT_S", 0.3)
    with pytest.raises(MoMEError, match="another writer"):
        add_correction_case(tmp_path, folder / "CT.nrrd", folder / "CT.seg.nrrd", case_id="x")
    old = os.stat(lock).st_mtime - 3600
    os.utime(lock, (old, old))  # a writer that died an hour ago
    add_correction_case(tmp_path, folder / "CT.nrrd", folder / "CT.seg.nrrd", case_id="x")
    assert _files(tmp_path) == ["manifest.json", "x", "x/image.nrrd", "x/segmentation.seg.nrrd"]


def test_parse_labels(tmp_path):
    assert parse_labels("Liver=liver, Left kidney = kidney_left,") == {"Liver": "liver", "Left kidney": "kidney_left"}
    assert parse_labels(None) is None and parse_labels(" ") is None
    (tmp_path / "l.json").write_text('{"1": ["liver"]}')
    assert parse_labels(str(tmp_path / "l.json")) == {"1": ["liver"]}
    with pytest.raises(InputError, match="expected NAME=structure_id"):
        parse_labels("Liver:liver")
    with pytest.raises(InputError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        parse_labels(str(tmp_path / "bad.json"))


def test_cli_add_and_list(case, tmp_path, capsys):
    folder, _, _ = case
    dataset = tmp_path / "corrections"
    rc = main(["corrections", "add", str(folder / "CT.nrrd"), str(folder / "CT.seg.nrrd"), "--dataset", str(dataset),
               "--labels", "Liver=liver,Left kidney=kidney_left", "--case-id", "p1", "--model", "mome-demo"])
    out = capsys.readouterr().out
    assert rc == 0 and "added p1: kidney_left, liver" in out
    assert "left out (no structure id): Spleen, Right kidney, Tumour blob" in out
    (dataset / "p1" / "image.nrrd").unlink()
    assert main(["corrections", "list", "--dataset", str(dataset)]) == 0
    out = capsys.readouterr().out
    assert "p1" in out and "mome-demo" in out and "MISSING p1/image.nrrd" in out and "1 case(s)" in out


@pytest.mark.parametrize("extra, message", [
    (["--labels", "Liver=lvr"], "unknown structure id 'lvr'"),
    (["--labels", "Liver"], "expected NAME=structure_id"),
    (["--case-id", "p1"], "case 'p1' exists"),
])
def test_cli_mistakes_are_one_line(case, tmp_path, capsys, extra, message):
    folder, _, _ = case
    dataset = tmp_path / "c"
    add_correction_case(dataset, folder / "CT.nrrd", folder / "CT.seg.nrrd", case_id="p1")
    capsys.readouterr()
    rc = main(["corrections", "add", str(folder / "CT.nrrd"), str(folder / "CT.seg.nrrd"), "-d", str(dataset), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mome: error: ") and message in err and err.count("\n") == 1


def test_cli_exit_status_without_traceback(case, tmp_path):
    folder, _, _ = case
    proc = subprocess.run([sys.executable, "-m", "MoMESegmentationLib.cli", "corrections", "list", "-d",
                           str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"mome: error: {tmp_path / 'none'}: no manifest.json (add a case with mome corrections add)"
