"""Unusable inputs raise InputError with one line naming the file and the problem."""

from __future__ import annotations

import numpy as np
import pytest

from MoMESegmentationLib.errors import InputError, MoMEError
from MoMESegmentationLib.io.readers import read_volume
from MoMESegmentationLib.io.volume import Volume

nib = pytest.importorskip("nibabel")
sitk = pytest.importorskip("SimpleITK")


def save_nifti(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), str(path))
    return path


def save_itk(path, array_kji, vector=False):
    sitk.WriteImage(sitk.GetImageFromArray(array_kji, isVector=vector), str(path))
    return path


def write_ct(folder, slices, **kwargs):
    from test_io_dicom import write_ct_series  # same folder as this file

    return write_ct_series(folder, np.zeros((4, 4, slices), np.int16), **kwargs)


def missing(tmp_path):
    return tmp_path / "nowhere.nii.gz", "not found"


def text_as_nifti(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("patient notes, not an image")
    return path, "not a readable NIfTI"


def truncated_nifti(tmp_path):
    path = save_nifti(tmp_path / "cut.nii.gz", np.zeros((8, 8, 8), np.int16))
    path.write_bytes(path.read_bytes()[:60])
    return path, "not a readable NIfTI"


def text_as_nrrd(tmp_path):
    path = tmp_path / "fake.nrrd"
    path.write_text("hello")
    return path, "not a readable image"


def unknown_suffix(tmp_path):
    path = tmp_path / "report.pdf"
    path.write_bytes(b"%PDF-1.4")
    return path, "unsupported file type"


def nifti_2d(tmp_path):
    return save_nifti(tmp_path / "slice.nii", np.zeros((16, 16), np.int16)), "2D image (shape 16x16)"


def nifti_single_slice(tmp_path):
    return save_nifti(tmp_path / "slice.nii.gz", np.zeros((16, 16, 1), np.int16)), "2D image (shape 16x16x1)"


def nrrd_2d(tmp_path):
    return save_itk(tmp_path / "slice.nrrd", np.zeros((16, 12), np.int16)), "2D image (shape 12x16)"


def nifti_4d(tmp_path):
    return save_nifti(tmp_path / "dyn.nii.gz", np.zeros((6, 6, 6, 3), np.float32)), "4D image (shape 6x6x6x3)"


def mha_4d(tmp_path):
    return save_itk(tmp_path / "dyn.mha", np.zeros((2, 3, 4, 5), np.int16)), "4D image"


def rgb_mha(tmp_path):
    return save_itk(tmp_path / "photo.mha", np.zeros((3, 4, 5, 3), np.uint8), vector=True), "3-component"


def nan_nifti(tmp_path):
    data = np.zeros((5, 5, 5), np.float32)
    data[1, 2, 3] = np.nan
    return save_nifti(tmp_path / "nan.nii.gz", data), "1 voxel(s) are NaN"


def nan_nrrd(tmp_path):
    data = np.zeros((5, 5, 5), np.float64)
    data[:, 0, 0] = np.nan
    return save_itk(tmp_path / "nan.nrrd", data), "5 voxel(s) are NaN"


def inf_mha(tmp_path):
    data = np.zeros((5, 5, 5), np.float32)
    data[0, 0, 0] = np.inf
    return save_itk(tmp_path / "inf.mha", data), "infinite"


def empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", "no DICOM image files"


def folder_of_junk(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    (tmp_path / "junk" / "b.bin").write_bytes(b"\x00" * 300)
    return tmp_path / "junk", "no DICOM image files"


def two_ct_series(tmp_path):
    write_ct(tmp_path / "two", 3, description="Arterial", seed=1)
    write_ct(tmp_path / "two", 4, description="Venous", seed=2)
    return tmp_path / "two", "2 CT series"


def single_dicom_slice(tmp_path):
    write_ct(tmp_path / "one", 1)
    return tmp_path / "one", "single slice"


def duplicated_dicom_slices(tmp_path):
    uid = write_ct(tmp_path / "dup", 3, seed=1)
    write_ct(tmp_path / "dup" / "copy", 3, series_uid=uid, seed=2)
    return tmp_path / "dup", "same position"


CASES = [
    missing,
    text_as_nifti,
    truncated_nifti,
    text_as_nrrd,
    unknown_suffix,
    nifti_2d,
    nifti_single_slice,
    nrrd_2d,
    nifti_4d,
    mha_4d,
    rgb_mha,
    nan_nifti,
    nan_nrrd,
    inf_mha,
    empty_folder,
    folder_of_junk,
    two_ct_series,
    single_dicom_slice,
    duplicated_dicom_slices,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_raises_one_line_input_error(tmp_path, case):
    path, problem = case(tmp_path)
    with pytest.raises(InputError) as info:
        read_volume(path)
    message = str(info.value)
    assert isinstance(info.value, MoMEError)
    assert "\n" not in message and len(message) < 600
    assert str(path) in message, message
    assert problem in message, message
    assert "Traceback" not in message


def test_directory_with_image_suffix_is_refused(tmp_path):
    (tmp_path / "folder.nii.gz").mkdir()
    (tmp_path / "folder.nii.gz" / "x.txt").write_text("x")
    with pytest.raises(InputError, match="no DICOM image files"):
        read_volume(tmp_path / "folder.nii.gz")


def test_volume_rejects_non_3d_arrays_early():
    with pytest.raises(ValueError, match="3D"):
        Volume(np.zeros((4, 4)))
