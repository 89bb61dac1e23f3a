"""DICOM series folders built with pydicom: ordering, rescale, oblique geometry, series choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from MoMESegmentationLib.errors import InputError
from MoMESegmentationLib.io.dicom import list_dicom_series, read_dicom_series
from MoMESegmentationLib.io.readers import read_volume

pydicom = pytest.importorskip("pydicom")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def oblique_cosines(angle: float, tilt: float) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal row and column cosines rotated about z by `angle` and about the row by `tilt`."""
    row = np.array([np.cos(angle), np.sin(angle), 0.0])
    column = np.array([-np.sin(angle), np.cos(angle), 0.0])
    column = np.cos(tilt) * column + np.sin(tilt) * np.cross(row, column)
    return row, column


def write_ct_series(
    folder: Path,
    stored: np.ndarray,
    spacing=(0.7, 0.8, 2.5),
    origin=(-120.0, 35.5, 400.0),
    cosines=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    description: str = "Abdomen",
    modality: str = "CT",
    seed: int = 0,
) -> str:
    """Write `stored[i, j, k]` as one file per k slice, in shuffled file names and instance numbers.

    Slice k sits at origin + k * spacing[2] * normal; i runs along the row cosines (columns of the
    pixel matrix), j along the column cosines (rows of the pixel matrix).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    series_uid = series_uid or generate_uid()
    row, column = (np.asarray(c, dtype=np.float64) for c in cosines)
    normal = np.cross(row, column)
    size_i, size_j, size_k = stored.shape
    names = rng.permutation(size_k)
    for k in range(size_k):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        ds.SeriesDescription = description
        ds.PatientID = "PHANTOM"
        ds.InstanceNumber = int(rng.integers(1, 10_000))
        position = np.asarray(origin) + k * spacing[2] * normal
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row, *column)]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = size_j, size_i
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T.astype("<i2")).tobytes()
        ds.save_as(folder / f"IM{series_uid[-6:]}_{names[k]:04d}", enforce_file_format=True)
    return series_uid


def stored_values(shape=(6, 5, 4), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3000, size=shape).astype(np.int16)


def test_axial_series_values_and_geometry(tmp_path):
    stored = stored_values()
    write_ct_series(tmp_path / "ct", stored, seed=1)
    volume = read_volume(tmp_path / "ct")
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, stored.astype(np.int32) - 1024)
    np.testing.assert_allclose(volume.spacing, [0.7, 0.8, 2.5], atol=1e-6)
    np.testing.assert_allclose(volume.origin, [-120.0, 35.5, 400.0], atol=1e-6)
    np.testing.assert_allclose(volume.direction, np.eye(3), atol=1e-7)
    assert "Abdomen" in volume.name


@pytest.mark.parametrize("slope, intercept", [(2.5, -1000.0), (0.5, 0.25), (1.0, -1024.0)])
def test_oblique_shuffled_series_with_rescale(tmp_path, slope, intercept):
    stored = stored_values((7, 5, 6), seed=2)
    cosines = oblique_cosines(angle=0.4, tilt=0.3)
    write_ct_series(
        tmp_path / "ct",
        stored,
        spacing=(0.6, 0.9, 1.7),
        cosines=cosines,
        slope=slope,
        intercept=intercept,
        seed=3,
    )
    volume = read_volume(tmp_path / "ct")
    np.testing.assert_allclose(volume.array, stored * slope + intercept, rtol=1e-6)
    if slope != 1.0 or not float(intercept).is_integer():
        assert volume.array.dtype == np.float32
    expected_direction = np.stack([*cosines, np.cross(*cosines)], axis=1)
    np.testing.assert_allclose(volume.direction, expected_direction, atol=1e-6)
    np.testing.assert_allclose(volume.spacing, [0.6, 0.9, 1.7], atol=1e-5)
    # the voxel (2, 3, 4) sits where the DICOM geometry says it does
    row, column = cosines
    expected = (
        np.array([-120.0, 35.5, 400.0]) + 2 * 0.6 * row + 3 * 0.9 * column + 4 * 1.7 * np.cross(row, column)
    )
    np.testing.assert_allclose(volume.index_to_physical([2, 3, 4]), expected, atol=1e-4)


def test_slices_ordered_by_position_when_normal_points_down(tmp_path):
    """Slice positions decreasing along the file order still come out ordered along +normal."""
    stored = stored_values((4, 4, 5), seed=4)
    row, column = np.array([1.0, 0, 0]), np.array([0, -1.0, 0])  # normal = -z (feet first)
    write_ct_series(tmp_path / "ct", stored, cosines=(row, column), origin=(0.0, 0.0, 0.0), seed=5)
    volume = read_volume(tmp_path / "ct")
    np.testing.assert_array_equal(volume.array, stored.astype(np.int32) - 1024)
    np.testing.assert_allclose(volume.direction[:, 2], [0, 0, -1.0], atol=1e-9)


def test_two_ct_series_need_a_uid(tmp_path):
    first = write_ct_series(
        tmp_path / "mixed", stored_values((4, 4, 3), 1), description="Soft tissue", seed=1
    )
    second = write_ct_series(tmp_path / "mixed", stored_values((4, 4, 5), 2), description="Lung", seed=2)
    found = list_dicom_series(tmp_path / "mixed")
    assert sorted(s.num_slices for s in found) == [3, 5]
    with pytest.raises(InputError) as info:
        read_volume(tmp_path / "mixed")
    message = str(info.value)
    assert "\n" not in message and "series_uid" in message
    for text in (first, second, "Soft tissue", "Lung", "3 slices", "5 slices", "mixed"):
        assert text in message
    volume = read_volume(tmp_path / "mixed", series_uid=second)
    assert volume.shape == (4, 4, 5)
    np.testing.assert_array_equal(volume.array, stored_values((4, 4, 5), 2).astype(np.int32) - 1024)
    with pytest.raises(InputError, match="no series with SeriesInstanceUID 1.2.3"):
        read_volume(tmp_path / "mixed", series_uid="1.2.3")


def test_only_ct_series_is_chosen_among_others(tmp_path):
    write_ct_series(tmp_path / "mixed", stored_values((4, 4, 3), 1), modality="MR", description="T1", seed=1)
    write_ct_series(tmp_path / "mixed", stored_values((4, 4, 4), 2), description="CT", seed=2)
    (tmp_path / "mixed" / "notes.txt").write_text("not dicom")
    assert read_volume(tmp_path / "mixed").shape == (4, 4, 4)


def test_one_file_of_a_series_reads_its_series(tmp_path):
    write_ct_series(tmp_path / "mixed", stored_values((4, 4, 3), 1), seed=1)
    uid = write_ct_series(tmp_path / "mixed", stored_values((4, 4, 5), 2), seed=2)
    one = next(
        p
        for p in sorted((tmp_path / "mixed").iterdir())
        if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == uid
    )
    assert read_volume(one).shape == (4, 4, 5)


def test_missing_slice_is_reported(tmp_path):
    write_ct_series(tmp_path / "ct", stored_values((4, 4, 6), 1), seed=1)
    victims = sorted(
        (tmp_path / "ct").iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2])
    )
    victims[3].unlink()
    with pytest.raises(InputError, match="unevenly spaced"):
        read_dicom_series(tmp_path / "ct")
