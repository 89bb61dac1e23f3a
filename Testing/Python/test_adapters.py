"""Every dataset table finds its cases in a fake folder of its real layout and maps labels right.

The fake folders are built from one small phantom: each table's label values are painted where
the phantom has the structure the value stands for, so loading a case must give back the
phantom's masks, including the patient-side split of structures labelled once for both sides.
"""

from __future__ import annotations

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
phantoms = pytest.importorskip("MoMESegmentationLib.data.phantoms")

from MoMESegmentationLib.errors import MoMEError  # noqa: E402
from MoMESegmentationLib.training.adapters import DatasetAdapter, list_adapters, load_table  # noqa: E402
from MoMESegmentationLib.training.datasets import load_case  # noqa: E402

EXPECTED = [
    "abdomenct1k", "amos22_ct", "btcv", "chaos_ct", "ctorg", "kits19", "kits23", "lits", "msd_task03_liver",
    "msd_task06_lung", "msd_task07_pancreas", "msd_task08_hepaticvessel", "msd_task09_spleen", "msd_task10_colon",
    "totalsegmentator_v2", "word",
]

# (image path, label path) of the labelled cases, plus files that must not become cases.
LAYOUTS = {
    "btcv": ([("RawData/Training/img/img0001.nii.gz", "RawData/Training/label/label0001.nii.gz"),
              ("RawData/Training/img/img0002.nii.gz", "RawData/Training/label/label0002.nii.gz")],
             ["RawData/Testing/img/img0061.nii.gz"]),
    "amos22_ct": ([("imagesTr/amos_0001.nii.gz", "labelsTr/amos_0001.nii.gz"),
                   ("imagesVa/amos_0008.nii.gz", "labelsVa/amos_0008.nii.gz")],
                  ["imagesTr/amos_0507.nii.gz", "labelsTr/amos_0507.nii.gz", "imagesTs/amos_0002.nii.gz"]),
    "word": ([("imagesTr/word_0001.nii.gz", "labelsTr/word_0001.nii.gz"),
              ("imagesVal/word_0101.nii.gz", "labelsVal/word_0101.nii.gz")], []),
    "kits19": ([("data/case_00000/imaging.nii.gz", "data/case_00000/segmentation.nii.gz")],
               ["data/case_00210/imaging.nii.gz"]),
    "kits23": ([("dataset/case_00000/imaging.nii.gz", "dataset/case_00000/segmentation.nii.gz"),
                ("dataset/case_00589/imaging.nii.gz", "dataset/case_00589/segmentation.nii.gz")], []),
    "lits": ([("Training Batch 1/volume-0.nii", "Training Batch 1/segmentation-0.nii"),
              ("Training Batch 2/volume-28.nii", "Training Batch 2/segmentation-28.nii")], []),
    "abdomenct1k": ([("Image/Case_00001_0000.nii.gz", "Mask/Case_00001.nii.gz")], []),
    "ctorg": ([("OrganSegmentations/volume-0.nii.gz", "OrganSegmentations/labels-0.nii.gz")], []),
}
for _task in ("03_liver", "06_lung", "07_pancreas", "08_hepaticvessel", "09_spleen", "10_colon"):
    _stem = _task.split("_")[1]
    LAYOUTS[f"msd_task{_task}"] = ([(f"imagesTr/{_stem}_001.nii.gz", f"labelsTr/{_stem}_001.nii.gz"),
                                    (f"imagesTr/{_stem}_002.nii.gz", f"labelsTr/{_stem}_002.nii.gz")],
                                   [f"imagesTr/._{_stem}_001.nii.gz", f"imagesTs/{_stem}_003.nii.gz"])


@pytest.fixture(scope="module")
def phantom():
    p = phantoms.make_phantom(0, shape=(28, 28, 28), random_orientation=False, random_fov=False)
    names = {n: v for v, n in p.label_table.items()}
    lab = np.asarray(p.labels.array)
    masks = {n: lab == v for n, v in names.items() if (lab == v).any()}
    assert {"liver", "spleen", "kidney_left", "kidney_right"} <= set(masks)
    return p, masks


def _save(path, array, volume):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), volume.affine_ras), str(path))


def _paint(table, masks, shape):
    """A label map in the table's values; structures without phantom counterpart get a blob."""
    label = np.zeros(shape, np.int16)
    expected = {}
    split_sources = table.labels.split_laterality
    for value, ids in sorted(table.labels.values.items()):
        own = ids[0]
        if own in split_sources:
            right, left = split_sources[own]
            if right not in masks or left not in masks:
                continue
            label[masks[right] | masks[left]] = value
            expected[right], expected[left] = masks[right], masks[left]
        elif own in masks and own not in expected:
            label[masks[own]] = value
            expected[own] = masks[own]
    if not expected:  # e.g. tumour-only tasks: a blob with the first value
        value, ids = min(table.labels.values.items())
        label[2:6, 2:6, 2:6] = value
        expected[ids[0]] = label == value
    return label, expected


def test_every_public_dataset_has_a_table():
    assert set(EXPECTED) <= set(list_adapters())


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_paired_layouts(name, tmp_path, phantom):
    p, masks = phantom
    table = load_table(name)
    label, expected = _paint(table, masks, p.labels.shape)
    assert expected, f"{name}: nothing to check"
    cases, extras = LAYOUTS[name]
    for image_rel, label_rel in cases:
        _save(tmp_path / image_rel, p.image.array.astype(np.int16), p.image)
        _save(tmp_path / label_rel, label, p.labels)
    for rel in extras:
        _save(tmp_path / rel, p.image.array.astype(np.int16), p.image)
    found = DatasetAdapter(table, tmp_path).find_cases()
    assert len(found) == len(cases), [c.case_id for c in found]
    image, labels, values = load_case(found[0])
    assert image.shape == p.image.shape
    for structure, mask in expected.items():
        got = np.isin(labels, [v for v, ids in values.items() if structure in ids])
        assert np.array_equal(got, mask), f"{name}: {structure}"


def test_totalsegmentator_structure_files(tmp_path, phantom):
    p, masks = phantom
    for case in ("s0001", "s0002"):
        _save(tmp_path / case / "ct.nii.gz", p.image.array.astype(np.int16), p.image)
        for structure in ("liver", "kidney_left", "vertebrae_L3"):
            _save(tmp_path / case / "segmentations" / f"{structure}.nii.gz",
                  masks.get(structure, np.zeros(p.labels.shape, bool)).astype(np.uint8), p.labels)
    table = load_table("totalsegmentator_v2")
    found = DatasetAdapter(table, tmp_path).find_cases()
    assert [c.case_id for c in found] == ["s0001", "s0002"]
    assert set(found[0].structure_files) == {"liver", "kidney_left", "vertebrae_L3"}
    _, labels, values = load_case(found[0])
    for structure in ("liver", "kidney_left"):
        got = np.isin(labels, [v for v, ids in values.items() if structure in ids])
        assert np.array_equal(got, masks[structure])


def test_chaos_dicom_and_png(tmp_path, phantom):
    pydicom = pytest.importorskip("pydicom")
    image_module = pytest.importorskip("PIL.Image")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    p, masks = phantom
    volume = p.image
    case = tmp_path / "Train_Sets" / "CT" / "1"
    (case / "DICOM_anon").mkdir(parents=True)
    (case / "Ground").mkdir(parents=True)
    series = generate_uid()
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID, series
        ds.Modality = "CT"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.PixelSpacing = [float(volume.spacing[1]), float(volume.spacing[0])]
        ds.ImageOrientationPatient = [*map(float, volume.direction[:, 0]), *map(float, volume.direction[:, 1])]
        ds.ImagePositionPatient = [float(v) for v in volume.origin + volume.direction[:, 2] * volume.spacing[2] * k]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.ascontiguousarray(volume.array[:, :, k].T.astype(np.int16)).tobytes()
        pydicom.dcmwrite(str(case / "DICOM_anon" / f"i{k:04d},0000b.dcm"), ds, enforce_file_format=True)
        mask = (masks["liver"][:, :, k].T * 255).astype(np.uint8)
        image_module.fromarray(mask).save(case / "Ground" / f"liver_GT_{k:03d}.png")
    found = DatasetAdapter(load_table("chaos_ct"), tmp_path).find_cases()
    assert [c.case_id for c in found] == ["1"]
    image, labels, values = load_case(found[0])
    assert np.allclose(image.array, volume.array.astype(np.int16))
    assert np.allclose(image.affine_lps, volume.affine_lps, atol=1e-4)
    got = np.isin(labels, [v for v, ids in values.items() if "liver" in ids])
    assert np.array_equal(got, masks["liver"])


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(MoMEError, match="no btcv cases"):
        DatasetAdapter(load_table("btcv"), tmp_path).find_cases()
    with pytest.raises(MoMEError, match="unknown"):
        load_table("not_a_dataset")


def test_manifest_with_slicer_segmentation_and_dry_run(tmp_path, phantom):
    """Fine-tuning input: an image plus a corrected .seg.nrrd exported from Slicer."""
    from MoMESegmentationLib.io.segmentation import Segment, Segmentation, write_segmentation
    from MoMESegmentationLib.training.config import config_from_dict
    from MoMESegmentationLib.training.datasets import manifest_records
    from MoMESegmentationLib.training.trainer import dry_run

    p, masks = phantom
    _save(tmp_path / "case1.nii.gz", p.image.array.astype(np.int16), p.image)
    seg = Segmentation(p.labels, [Segment("Liver", masks["liver"], (0.8, 0.4, 0.3), 1),
                                  Segment("Left kidney", masks["kidney_left"], (0.2, 0.6, 0.2), 2)])
    write_segmentation(seg, tmp_path / "case1.seg.nrrd")
    entries = [{"image": "case1.nii.gz", "label": "case1.seg.nrrd"}]
    (tmp_path / "manifest.json").write_text(__import__("json").dumps(entries))
    raw = {"data": {"structures": ["liver", "kidney_left"], "datasets": [
        {"kind": "manifest", "name": "corrected", "manifest": str(tmp_path / "manifest.json"),
         "labels": {"Liver": "liver", "Left kidney": "kidney_left"}}]},
        "text": {"embeddings_cache": str(tmp_path / "none.safetensors")}}
    config = config_from_dict(raw)
    (record, split), = manifest_records(config.data.datasets[0])
    assert record.label_kind == "seg_nrrd" and split == "train"
    _, labels, values = load_case(record)
    for structure in ("liver", "kidney_left"):
        got = np.isin(labels, [v for v, ids in values.items() if structure in ids])
        assert np.array_equal(got, masks[structure])
    table = dry_run(config)
    assert "corrected" in table and "liver, kidney_left" in table
