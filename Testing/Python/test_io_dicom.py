"""DICOM series folders as scanners, PACS and anonymizers write them.

Every case is written with pydicom (see ``dicom_fixtures``), most of them from a crop of the bundled
real CT, and read back through ``read_volume``; values and physical geometry are compared with the
regular, uncompressed original.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from MoMESegmentationLib.errors import InputError
from MoMESegmentationLib.io.dicom import list_dicom_series, read_dicom_series, series_id_of
from MoMESegmentationLib.io.readers import read_volume
from MoMESegmentationLib.io.volume import Volume

pydicom = pytest.importorskip("pydicom")

from dicom_fixtures import (  # noqa: E402  (same folder; needs pydicom)
    MISSING,
    SECONDARY_CAPTURE_IMAGE_STORAGE,
    TRANSFER_SYNTAXES,
    example_ct,
    write_dicomdir,
    write_enhanced_ct,
    write_junk,
)
from dicom_fixtures import write_ct_series as write_series  # noqa: E402

#: Gantry tilt of the sheared-stack cases, degrees.
TILT_DEGREES = 20.0
#: Air, the value of resampled voxels that no slice covers.
AIR_HU = -1024
DICOM_LOGGER = "MoMESegmentationLib.io.dicom"


def oblique_cosines(angle: float, tilt: float) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal row and column cosines rotated about z by `angle` and about the row by `tilt`."""
    row = np.array([np.cos(angle), np.sin(angle), 0.0])
    column = np.array([-np.sin(angle), np.cos(angle), 0.0])
    column = np.cos(tilt) * column + np.sin(tilt) * np.cross(row, column)
    return row, column


def write_ct_series(
    folder: Path, stored: np.ndarray, cosines=None, slope=1.0, intercept=-1024.0, **kwargs
) -> str:
    """Stored values in, SeriesInstanceUID out: the short form that test_io_bad_input uses.

    See ``dicom_fixtures.write_ct_series`` for the arguments; ``cosines`` are (row, column).
    """
    direction = None
    if cosines is not None:
        row, column = (np.asarray(c, dtype=np.float64) for c in cosines)
        direction = np.stack([row, column, np.cross(row, column)], axis=1)
    hu = np.asarray(stored, dtype=np.float64) * slope + intercept
    written = write_series(folder, hu, direction=direction, slope=slope, intercept=intercept, **kwargs)
    return written.series_uid


def stored_values(shape=(6, 5, 4), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3000, size=shape).astype(np.int16)


def assert_same_volume(volume: Volume, expected: Volume, atol_hu: float = 0.0) -> None:
    """Same grid (shape, origin, spacing, direction) and values within ``atol_hu``."""
    assert volume.shape == expected.shape
    np.testing.assert_allclose(volume.origin, expected.origin, atol=1e-4)
    np.testing.assert_allclose(volume.spacing, expected.spacing, atol=1e-5)
    np.testing.assert_allclose(volume.direction, expected.direction, atol=1e-6)
    difference = np.abs(volume.array.astype(np.float64) - expected.array.astype(np.float64))
    assert difference.max() <= atol_hu, difference.max()


def transfer_syntax_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


# --------------------------------------------------------------------------------------------
# Values, rescale, orientation, ordering
# --------------------------------------------------------------------------------------------


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


def test_orientation_written_with_few_digits_gives_an_orthonormal_grid(tmp_path):
    """Scanners write ImageOrientationPatient with 5-6 decimals: the cosines are then not quite unit
    vectors, and the grid must still be orthonormal (as ITK and Slicer make it)."""
    cosines = oblique_cosines(angle=0.5, tilt=0.25)
    row, column = cosines
    written = write_series(tmp_path / "ct", stored_values((6, 5, 4), seed=4).astype(np.float64) - 1024,
                           direction=np.stack([row, column, np.cross(row, column)], axis=1), seed=5)
    rounded = [round(float(v), 3) for v in np.concatenate(cosines)]
    for path in written.paths:
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = rounded
        ds.save_as(path)
    assert abs(np.linalg.norm(rounded[3:]) - 1.0) > 1e-4, "the rounded cosines are not unit vectors"
    volume = read_volume(tmp_path / "ct")
    np.testing.assert_allclose(volume.direction.T @ volume.direction, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(volume.direction[:, :2], np.stack(cosines, axis=1), atol=2e-3)


def test_row_and_column_directions_far_from_perpendicular_are_refused(tmp_path):
    written = write_series(tmp_path / "ct", stored_values((6, 5, 4)).astype(np.float64) - 1024, seed=1)
    skewed = [1.0, 0.0, 0.0, math.sin(math.radians(10)), math.cos(math.radians(10)), 0.0]  # 80 degrees
    for path in written.paths:
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = skewed
        ds.save_as(path)
    with pytest.raises(InputError, match=r"row and column directions 80\.0 degrees apart"):
        read_volume(tmp_path / "ct")


def test_slices_ordered_by_position_when_normal_points_down(tmp_path):
    """Slice positions decreasing along the file order still come out ordered along +normal."""
    stored = stored_values((4, 4, 5), seed=4)
    row, column = np.array([1.0, 0, 0]), np.array([0, -1.0, 0])  # normal = -z (feet first)
    write_ct_series(tmp_path / "ct", stored, cosines=(row, column), origin=(0.0, 0.0, 0.0), seed=5)
    volume = read_volume(tmp_path / "ct")
    np.testing.assert_array_equal(volume.array, stored.astype(np.int32) - 1024)
    np.testing.assert_allclose(volume.direction[:, 2], [0, 0, -1.0], atol=1e-9)


# --------------------------------------------------------------------------------------------
# Series choice and grouping
# --------------------------------------------------------------------------------------------


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


def test_one_file_without_a_series_uid_reads_its_series(tmp_path):
    """Reading one file goes through the folder's grouping: no SeriesInstanceUID element at all."""
    ct = example_ct(shape=(16, 16, 5))
    folder = tmp_path / "anonymized"
    written = write_series(folder, ct, series_uid=MISSING, series_number=4, file_names="sop_uid")
    other = example_ct(shape=(16, 16, 3), start=(40, 40, 60))
    write_series(folder, other, series_uid=MISSING, series_number=5, seed=1)
    assert "SeriesInstanceUID" not in pydicom.dcmread(written.paths[2], stop_before_pixels=True)
    ids = {s.num_slices: s.uid for s in list_dicom_series(folder)}
    assert series_id_of(folder, written.paths[2]) == ids[5]
    assert_same_volume(read_volume(written.paths[2]), ct)


def test_one_file_of_a_split_off_part_reads_that_part(tmp_path):
    """A file of the smaller reconstruction under a shared UID reads ``UID#2``, not the larger part."""
    ct = example_ct(shape=(16, 16, 6))
    folder = tmp_path / "recons"
    coarse = write_series(folder, ct)
    uid = coarse.series_uid
    fine = Volume(ct.array[:, :, :4], spacing=(1.0, 1.0, 1.5), origin=ct.origin, direction=ct.direction)
    split = write_series(folder, fine, series_uid=uid, file_names="sop_uid", seed=1)
    assert series_id_of(folder, split.paths[1]) == uid + "#2"
    assert series_id_of(folder, coarse.paths[3]) == uid
    assert_same_volume(read_volume(split.paths[1]), fine)
    assert_same_volume(read_volume(coarse.paths[3]), ct)


def test_one_file_that_is_not_dicom_is_named(tmp_path):
    path = tmp_path / "scan.dcm"
    path.write_bytes(b"\x00" * 200)
    with pytest.raises(InputError, match="scan.dcm: not a readable DICOM file"):
        read_volume(path)


def test_anonymized_export_with_empty_series_uid_in_jpeg2000(tmp_path):
    """The reported export: 20 slices named by SOP Instance UID, J2K lossless, empty Series UID."""
    ct = example_ct()
    folder = tmp_path / "export"
    written = write_series(
        folder, ct, transfer_syntax=TRANSFER_SYNTAXES["j2k_lossless"], series_uid="", file_names="sop_uid"
    )
    first = pydicom.dcmread(written.paths[0], stop_before_pixels=True)
    assert first.SeriesInstanceUID == "" and "." not in written.paths[0].name[-4:]
    assert written.paths[0].name == first.SOPInstanceUID
    (series,) = list_dicom_series(folder)
    assert series.uid.startswith("nouid-") and series.num_slices == 20
    assert list_dicom_series(folder)[0].uid == series.uid  # the id is stable
    assert_same_volume(read_volume(folder), ct)
    assert_same_volume(read_volume(folder, series_uid=series.uid), ct)
    assert_same_volume(read_volume(written.paths[7]), ct)  # one file of the series


def test_missing_and_empty_series_uid_are_grouped_by_the_fallback_key(tmp_path):
    ct = example_ct(shape=(16, 16, 4))
    folder = tmp_path / "mixed"
    write_series(folder, ct, series_uid=MISSING, series_number=2, description="Venous")
    write_series(folder, ct, series_uid="", series_number=3, description="Venous", seed=1)
    thin = Volume(ct.array, spacing=(1.5, 1.5, 3.0), origin=ct.origin, direction=ct.direction)
    write_series(folder, thin, series_uid="", series_number=3, description="Venous", seed=2)
    found = list_dicom_series(folder)
    assert [s.num_slices for s in found] == [4, 4, 4]
    ids = [s.uid for s in found]
    assert len(set(ids)) == 3 and all(uid.startswith("nouid-") for uid in ids)
    assert sum("#2" in uid for uid in ids) == 1  # same key, other pixel spacing: a second part
    with pytest.raises(InputError, match="3 CT series"):
        read_volume(folder)
    spacings = {}
    for series in found:
        volume = read_volume(folder, series_uid=series.uid)
        np.testing.assert_array_equal(volume.array, ct.array)
        spacings[series.uid] = float(volume.spacing[0])
    split = next(uid for uid in ids if "#2" in uid)
    assert {spacings[split], spacings[split.split("#")[0]]} == {1.5, 3.0}
    with pytest.raises(InputError, match="no series with SeriesInstanceUID ''"):
        read_dicom_series(folder, series_uid="")  # several series without a UID: ambiguous


def test_two_reconstructions_under_one_uid_are_split(tmp_path):
    ct = example_ct(shape=(16, 16, 6))
    folder = tmp_path / "recons"
    uid = write_series(folder, ct, description="Abdomen").series_uid
    fine = Volume(ct.array[:, :, :5], spacing=(1.0, 1.0, 1.5), origin=ct.origin, direction=ct.direction)
    write_series(folder, fine, series_uid=uid, description="Abdomen", seed=1)
    found = list_dicom_series(folder)
    assert [(s.uid, s.num_slices) for s in found] == [(uid, 6), (uid + "#2", 5)]
    with pytest.raises(InputError) as info:
        read_volume(folder)
    message = str(info.value)
    assert "2 CT series" in message and f"{uid} 'Abdomen' (CT, 6 slices)" in message
    assert f"{uid}#2 'Abdomen' (CT, 5 slices)" in message
    assert_same_volume(read_volume(folder, series_uid=uid), ct)
    assert_same_volume(read_volume(folder, series_uid=uid + "#2"), fine)


def test_localizers_and_derived_images_are_left_out(tmp_path, caplog):
    ct = example_ct(shape=(16, 16, 6))
    folder = tmp_path / "study"
    uid = write_series(folder, ct).series_uid
    sagittal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]).T
    scout = Volume(ct.array[:, :, :1], spacing=(2.0, 2.0, 1.0), origin=ct.origin, direction=sagittal)
    write_series(folder, scout, series_uid=uid, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), seed=1)
    write_series(folder, ct, image_type=("DERIVED", "SECONDARY", "MPR"), description="MPR", seed=2)
    write_series(folder, ct, sop_class_uid=SECONDARY_CAPTURE_IMAGE_STORAGE, description="Key images", seed=3)
    with caplog.at_level(logging.WARNING, logger=DICOM_LOGGER):
        found = list_dicom_series(folder)
        volume = read_volume(folder)
    assert [(s.uid, s.num_slices) for s in found] == [(uid, 6)]
    assert_same_volume(volume, ct)
    log = caplog.text
    for text in ("1 localizer image(s)", "6 derived secondary image(s)", "6 secondary capture(s)"):
        assert text in log


def test_unflagged_scout_in_the_series_does_not_get_in_the_way(tmp_path, caplog):
    """A single slice of another orientation under the series UID is a part of its own, not chosen."""
    ct = example_ct(shape=(16, 16, 6))
    folder = tmp_path / "study"
    uid = write_series(folder, ct).series_uid
    coronal = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]).T
    scout = Volume(ct.array[:, :, :1], spacing=(2.0, 2.0, 1.0), origin=ct.origin, direction=coronal)
    write_series(folder, scout, series_uid=uid, seed=1)
    with caplog.at_level(logging.WARNING, logger=DICOM_LOGGER):
        assert_same_volume(read_volume(folder), ct)
    assert f"{uid}#2 not considered: a single slice" in caplog.text
    with pytest.raises(InputError, match="single slice"):
        read_volume(folder, series_uid=uid + "#2")


def test_dicomdir_nested_folders_and_junk(tmp_path):
    ct = example_ct(shape=(32, 32, 8))
    written = write_series(tmp_path / "staging", ct, transfer_syntax=TRANSFER_SYNTAXES["rle"])
    export = tmp_path / "export"
    images = write_dicomdir(export, written.paths)
    assert (export / "DICOMDIR").is_file() and len(images) == 8
    assert all(len(p.relative_to(export).parts) > 1 and p.suffix == "" for p in images)
    write_junk(export)
    write_junk(images[0].parent / "extra")
    assert_same_volume(read_volume(export), ct)


def test_folder_of_only_scouts_says_what_was_left_out(tmp_path):
    ct = example_ct(shape=(16, 16, 2))
    write_series(tmp_path / "scouts", ct, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    with pytest.raises(InputError, match=r"no DICOM image files found \(left out: 2 localizer image\(s\)\)"):
        read_volume(tmp_path / "scouts")


# --------------------------------------------------------------------------------------------
# Transfer syntaxes
# --------------------------------------------------------------------------------------------

LOSSLESS = ["implicit", "explicit", "deflated", "rle", "jpeg_lossless_sv1", "jpeg_ls", "j2k_lossless"]


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_transfer_syntax_decodes_exactly(tmp_path, name):
    ct = example_ct(shape=(64, 64, 6))
    written = write_series(tmp_path / name, ct, transfer_syntax=TRANSFER_SYNTAXES[name], file_names="index")
    assert transfer_syntax_of(written.paths[0]) == TRANSFER_SYNTAXES[name]
    assert_same_volume(read_volume(tmp_path / name), ct)


def test_jpeg_lossless_files_use_first_order_prediction(tmp_path):
    """Selection value 1 (the .70 syntax) is in the scan header of the GDCM-encoded frames."""
    ct = example_ct(shape=(32, 32, 2))
    written = write_series(tmp_path, ct, transfer_syntax=TRANSFER_SYNTAXES["jpeg_lossless_sv1"])
    from pydicom.encaps import generate_frames

    frame = next(generate_frames(pydicom.dcmread(written.paths[0]).PixelData, number_of_frames=1))
    start_of_scan = frame.index(b"\xff\xda")
    length = int.from_bytes(frame[start_of_scan + 2 : start_of_scan + 4], "big")
    predictor = frame[start_of_scan + 2 + length - 3]  # Ss, the first byte after the components
    assert frame[:2] == b"\xff\xd8" and b"\xff\xc3" in frame and predictor == 1


@pytest.mark.parametrize(
    "name, options, max_error",
    [("jpeg_ls_near", {"jls_error": 2}, 2), ("j2k", {"j2k_cr": [10]}, 400)],
)
def test_lossy_transfer_syntax_decodes_as_the_reference_decoder(tmp_path, name, options, max_error):
    """Lossy files: the values pydicom's plugins (CharLS, OpenJPEG) decode, close to the original."""
    ct = example_ct(shape=(64, 64, 4))
    written = write_series(tmp_path, ct, transfer_syntax=TRANSFER_SYNTAXES[name], encode_options=options)
    assert transfer_syntax_of(written.paths[0]) == TRANSFER_SYNTAXES[name]
    volume = read_volume(tmp_path)
    assert_same_volume(volume, ct, atol_hu=max_error)
    assert np.any(volume.array != ct.array)  # really lossy
    for k, path in enumerate(written.paths):
        reference = pydicom.dcmread(path).pixel_array.T.astype(np.int32) - 1024
        np.testing.assert_array_equal(volume.array[:, :, k], reference)


def test_undecodable_transfer_syntax_is_named(tmp_path):
    ct = example_ct(shape=(32, 32, 3))
    written = write_series(
        tmp_path, ct, transfer_syntax=TRANSFER_SYNTAXES["j2k_lossless"], file_names="index"
    )
    mpeg2 = "1.2.840.10008.1.2.4.100"
    for path in written.paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = mpeg2
        ds.save_as(path)
    with pytest.raises(InputError) as info:
        read_volume(tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(written.paths[0]) in message
    assert f"MPEG2 Main Profile / Main Level ({mpeg2})" in message


# --------------------------------------------------------------------------------------------
# Geometry: tilt, gaps, duplicates
# --------------------------------------------------------------------------------------------


def tilted_frame(degrees: float) -> np.ndarray:
    """Direction of a stack tilted about the patient's x axis: columns row, column, normal."""
    angle = math.radians(degrees)
    row = np.array([1.0, 0.0, 0.0])
    column = np.array([0.0, math.cos(angle), -math.sin(angle)])
    return np.stack([row, column, np.cross(row, column)], axis=1)


def test_gantry_tilt_is_resampled_onto_the_regular_grid(tmp_path, caplog):
    """Slices step along the table (z) while their planes are tilted by 20 degrees.

    The step is chosen so that each slice is shifted by exactly one row from the previous: every
    tilted slice is then a window of a regular volume, and resampling must give that volume back
    wherever a slice covers it, and air elsewhere.
    """
    size_j, size_k, pixel = 64, 20, 0.8
    normal_step = pixel / math.tan(math.radians(TILT_DEGREES))
    direction = tilted_frame(TILT_DEGREES)
    crop = example_ct(shape=(64, size_j + size_k - 1, size_k))
    regular = Volume(
        crop.array, spacing=(pixel, pixel, normal_step), origin=(-30.0, 12.0, 80.0), direction=direction
    )
    first_row = [size_k - 1 - k for k in range(size_k)]  # row of the regular volume where slice k starts
    sheared = np.stack(
        [regular.array[:, first_row[k] : first_row[k] + size_j, k] for k in range(size_k)], axis=2
    )
    positions = np.stack([regular.index_to_physical([0, first_row[k], k]) for k in range(size_k)])
    steps = np.diff(positions, axis=0)
    np.testing.assert_allclose(steps[:, :2], 0.0, atol=1e-9)  # the table moves along z only
    write_series(
        tmp_path / "tilt", sheared, spacing=regular.spacing, direction=direction, positions=positions
    )

    with caplog.at_level(logging.WARNING, logger=DICOM_LOGGER):
        volume = read_volume(tmp_path / "tilt")
    assert "gantry tilt 20.0 degrees" in caplog.text and "last slice 15.2 mm off" in caplog.text
    rows = np.arange(regular.shape[1])[None, :, None]
    covered = (rows >= np.asarray(first_row)[None, None, :]) & (
        rows < np.asarray(first_row)[None, None, :] + size_j
    )
    expected = Volume(
        np.where(np.broadcast_to(covered, regular.shape), regular.array, AIR_HU),
        spacing=regular.spacing,
        origin=regular.origin,
        direction=regular.direction,
    )
    assert_same_volume(volume, expected)
    # a voxel of slice 13 lands where the file puts it
    k, i, j = 13, 5, 7
    point = positions[k] + i * pixel * direction[:, 0] + j * pixel * direction[:, 1]
    index = np.round(volume.physical_to_index(point)).astype(int)
    np.testing.assert_allclose(volume.index_to_physical(index), point, atol=1e-4)
    assert volume.array[tuple(index)] == sheared[i, j, k]


def test_missing_slice_is_interpolated_with_a_warning(tmp_path, caplog):
    ct = example_ct()
    written = write_series(tmp_path / "ct", ct)
    written.paths[7].unlink()
    with caplog.at_level(logging.WARNING, logger=DICOM_LOGGER):
        volume = read_dicom_series(tmp_path / "ct")
    assert "largest gap 6.00 mm" in caplog.text and "median 3.00 mm" in caplog.text
    others = [k for k in range(ct.shape[2]) if k != 7]
    assert_same_volume(Volume(volume.array[:, :, others]), Volume(ct.array[:, :, others]))
    assert_same_volume(
        Volume(volume.array, volume.spacing, volume.origin, volume.direction),
        Volume(volume.array, ct.spacing, ct.origin, ct.direction),
    )
    between = (ct.array[:, :, 6].astype(np.float64) + ct.array[:, :, 8]) / 2
    assert np.max(np.abs(volume.array[:, :, 7] - between)) <= 0.5


def test_duplicate_positions_name_two_files(tmp_path):
    ct = example_ct(shape=(16, 16, 5))
    written = write_series(tmp_path / "ct", ct, file_names="index")
    copy = tmp_path / "ct" / "copy" / "again.dcm"
    copy.parent.mkdir()
    ds = pydicom.dcmread(written.paths[2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(copy)
    with pytest.raises(InputError) as info:
        read_volume(tmp_path / "ct")
    message = str(info.value)
    assert "\n" not in message and "same position" in message
    assert str(written.paths[2]) in message and str(copy) in message


# --------------------------------------------------------------------------------------------
# Multi-frame (enhanced) CT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rescale_in", ["shared", "per_frame", "top"])
def test_enhanced_ct_is_read_from_its_functional_groups(tmp_path, rescale_in):
    ct = example_ct(shape=(32, 24, 8))
    oblique = Volume(
        ct.array, spacing=(0.7, 0.9, 2.0), origin=(10.0, -20.0, 30.0), direction=tilted_frame(15.0)
    )
    write_enhanced_ct(tmp_path / "mf", oblique, rescale_in=rescale_in)
    (series,) = list_dicom_series(tmp_path / "mf")
    assert series.multi_frame and series.num_slices == 8 and len(series.files) == 1
    assert_same_volume(read_volume(tmp_path / "mf"), oblique)


def test_multi_frame_file_beside_a_series_does_not_stop_it(tmp_path, caplog):
    ct = example_ct(shape=(32, 32, 6))
    folder = tmp_path / "study"
    uid = write_series(folder / "single", ct).series_uid
    broken = write_enhanced_ct(
        folder / "enhanced", ct, frame_positions=False, description="Broken"
    ).series_uid
    with caplog.at_level(logging.WARNING, logger=DICOM_LOGGER):
        assert_same_volume(read_volume(folder), ct)
    assert f"{broken} not considered" in caplog.text
    with pytest.raises(InputError) as info:
        read_volume(folder, series_uid=broken)
    message = str(info.value)
    assert "\n" not in message and "enhanced.dcm" in message and "single-frame" in message

    good = write_enhanced_ct(folder / "enhanced2", ct, description="Enhanced").series_uid
    with pytest.raises(InputError, match="2 CT series"):
        read_volume(folder)
    assert_same_volume(read_volume(folder, series_uid=good), ct)
    assert_same_volume(read_volume(folder, series_uid=uid), ct)


def _linear_field_case(tilt, azimuth, yaw, pitch, pixel, step, count, dropped, gradient):
    """Slices of a linear HU field on a sheared, possibly gappy stack; returns what to write."""
    row, column = oblique_cosines(angle=yaw, tilt=pitch)
    normal = np.cross(row, column)
    shear = math.tan(math.radians(tilt)) * step * (math.cos(azimuth) * row + math.sin(azimuth) * column)
    start = np.array([-20.0, 15.0, 60.0])
    kept = [k for k in range(count) if k != dropped]
    positions = np.stack([start + k * (step * normal + shear) for k in kept])
    size_i, size_j = 10, 9
    index_i, index_j = np.meshgrid(np.arange(size_i), np.arange(size_j), indexing="ij")

    def field(points: np.ndarray) -> np.ndarray:
        return FIELD_OFFSET_HU + (points - start) @ np.asarray(gradient)

    planes = [
        position + index_i[..., None] * pixel[0] * row + index_j[..., None] * pixel[1] * column
        for position in positions
    ]
    hu = np.rint(np.stack([field(points) for points in planes], axis=2))
    direction = np.stack([row, column, normal], axis=1)
    return hu, positions, direction, field, step * normal + shear


#: The linear field's value at the first pixel of the first slice (HU), well above air.
FIELD_OFFSET_HU = 400.0


try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # hypothesis is a test extra
    given = None

if given is not None:

    @given(
        tilt=st.one_of(st.just(0.0), st.floats(3.0, 30.0)),
        azimuth=st.floats(0.0, 2 * math.pi),
        yaw=st.floats(-math.pi, math.pi),
        pitch=st.floats(-0.6, 0.6),
        pixel=st.tuples(st.floats(0.5, 1.5), st.floats(0.5, 1.5)),
        step=st.floats(1.5, 4.0),
        count=st.integers(5, 8),
        drop=st.booleans(),
        gradient=st.tuples(*[st.floats(-12.0, 12.0)] * 3),
    )
    def test_resampled_voxels_hold_the_value_at_their_physical_point(
        tilt, azimuth, yaw, pitch, pixel, step, count, drop, gradient
    ):
        """Tilted and gappy stacks of a linear field: every covered voxel holds the field's value
        at its own physical point (linear interpolation reproduces a linear field), every voxel
        outside the slices is air."""
        import tempfile

        dropped = count // 2 if drop else None
        hu, positions, direction, field, slice_step = _linear_field_case(
            tilt, azimuth, yaw, pitch, pixel, step, count, dropped, gradient
        )
        with tempfile.TemporaryDirectory() as folder:
            write_series(folder, hu, spacing=(*pixel, step), direction=direction, positions=positions)
            volume = read_volume(folder)
        np.testing.assert_allclose(volume.direction, direction, atol=1e-6)
        np.testing.assert_allclose(volume.spacing, [*pixel, step], rtol=1e-5)
        index = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), axis=-1)
        points = volume.origin + (index * volume.spacing) @ volume.direction.T
        # where each point falls in the stack: fraction of the slice step, then pixel indices
        depth = (points - positions[0]) @ direction[:, 2]
        along = depth / float(slice_step @ direction[:, 2])
        in_plane = points - positions[0] - along[..., None] * slice_step
        pixel_i = in_plane @ direction[:, 0] / pixel[0]
        pixel_j = in_plane @ direction[:, 1] / pixel[1]
        margin = 1e-3
        inside = (
            (pixel_i > margin)
            & (pixel_i < hu.shape[0] - 1 - margin)
            & (pixel_j > margin)
            & (pixel_j < hu.shape[1] - 1 - margin)
        )
        outside = (
            (pixel_i < -margin)
            | (pixel_i > hu.shape[0] - 1 + margin)
            | (pixel_j < -margin)
            | (pixel_j > hu.shape[1] - 1 + margin)
        )
        assert inside.sum() >= hu.shape[0] * hu.shape[1] * (count - 1) // 2
        error = np.abs(volume.array[inside] - field(points[inside]))
        assert error.max() <= 1.0 + 1e-6  # stored and resampled values are each rounded once
        assert np.all(volume.array[outside] == AIR_HU)
