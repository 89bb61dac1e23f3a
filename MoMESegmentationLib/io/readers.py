"""Read and write volumes with their exact geometry.

Formats, picked by the path:

* NIfTI (``.nii``, ``.nii.gz``) through nibabel; its RAS affine is converted to LPS.
* NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) through SimpleITK.
* DICOM: a folder (or one ``.dcm`` file of a series) through pydicom and SimpleITK, see
  :mod:`.dicom`.

Every reader returns a :class:`~.volume.Volume`: ``array[i, j, k]`` is voxel ``(i, j, k)`` and the
geometry is in LPS millimetres. Problems with an input file raise :class:`InputError` with a
one-line message naming the file; writes are atomic (a temporary file in the target folder, then
``os.replace``). SimpleITK, nibabel and pydicom are imported only when a function needs them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import InputError, MoMEError
from .volume import Volume

__all__ = [
    "SUPPORTED_SUFFIXES",
    "atomic_output",
    "image_format",
    "one_line",
    "read_volume",
    "write_labelmap",
    "write_volume",
]

logger = logging.getLogger(__name__)

#: File suffixes read and written by :func:`read_volume` / :func:`write_volume`.
SUPPORTED_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_FORMAT_OF_SUFFIX = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".nrrd": "itk",
    ".nhdr": "itk",
    ".mha": "itk",
    ".mhd": "itk",
    ".dcm": "dicom",
}
_WRITABLE_DTYPES = (
    np.uint8,
    np.int8,
    np.uint16,
    np.int16,
    np.uint32,
    np.int32,
    np.uint64,
    np.int64,
    np.float32,
    np.float64,
)


def one_line(exc: BaseException, limit: int = 200) -> str:
    """A library exception's message squeezed onto one short line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    for marker in ("sitk::ERROR:", "ITK ERROR:"):  # drop SimpleITK's source-file prefix
        if marker in text:
            text = text.split(marker, 1)[1].strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def image_format(path: str | os.PathLike) -> str:
    """``"nifti"``, ``"itk"`` (NRRD/MetaImage) or ``"dicom"``; :class:`InputError` for anything else."""
    path = Path(path)
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    for suffix, kind in _FORMAT_OF_SUFFIX.items():
        if name.endswith(suffix):
            return kind
    if path.is_file() and _has_dicom_preamble(path):
        return "dicom"
    raise InputError(
        f"{path}: unsupported file type; expected a DICOM folder or one of {', '.join(SUPPORTED_SUFFIXES)}"
    )


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_volume(path: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read a 3D image with its geometry.

    Args:
        path: a NIfTI, NRRD or MetaImage file, a DICOM folder, or one file of a DICOM series.
        series_uid: for DICOM folders holding several series, the id of the series to read (its
            SeriesInstanceUID, or another id from :func:`.dicom.list_dicom_series`); for one DICOM
            file it defaults to that file's series. Ignored for other formats.

    Returns:
        A :class:`Volume` (``array`` shape ``(I, J, K)``, LPS geometry) named after the file.

    Raises:
        InputError: the path is missing, not an image, not 3D, holds NaN voxels, or the DICOM
            folder is ambiguous (the message lists the series to choose from).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file or folder not found")
    kind = image_format(path)
    if kind == "dicom":
        from .dicom import read_dicom_series, series_id_of

        if path.is_file():  # the series the file belongs to, as the folder's grouping names it
            volume = read_dicom_series(path.parent, series_uid=series_uid or series_id_of(path.parent, path))
        else:
            volume = read_dicom_series(path, series_uid=series_uid)
    elif not path.is_file():
        raise InputError(f"{path}: is a folder, not a {kind.upper()} image file")
    elif kind == "nifti":
        volume = _read_nifti(path)
    else:
        volume = _read_itk(path)
    _check_finite(volume, path)
    return volume


def _check_shape(shape: tuple[int, ...], path: Path) -> tuple[int, ...]:
    """Drop trailing singleton axes beyond the third; reject anything that is not a 3D volume."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    text = "x".join(str(s) for s in shape)
    if len(shape) < 3 or min(shape) == 1:
        raise InputError(f"{path}: 2D image (shape {text}); expected a 3D volume")
    if len(shape) > 3:
        raise InputError(f"{path}: {len(shape)}D image (shape {text}); expected a 3D volume")
    return shape


def _check_finite(volume: Volume, path: Path) -> None:
    if np.issubdtype(volume.array.dtype, np.floating):
        bad = ~np.isfinite(volume.array)
        count = int(np.count_nonzero(bad))
        if count:
            what = "NaN" if np.isnan(volume.array).any() else "infinite"
            raise InputError(f"{path}: {count} voxel(s) are {what}; expected finite intensities")
    if not np.all(np.isfinite(volume.origin)) or not np.all(np.isfinite(volume.direction)):
        raise InputError(f"{path}: image geometry (origin or direction) is not finite")
    if abs(np.linalg.det(volume.direction)) < 1e-6:
        raise InputError(f"{path}: image axes are degenerate (direction matrix is singular)")


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(str(path), mmap=False)  # no open file handle after reading
        shape = _check_shape(image.shape, path)
        affine = np.asarray(image.affine, dtype=np.float64)
        array = np.asanyarray(image.dataobj).reshape(shape)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: not a readable NIfTI image ({one_line(exc)})") from exc
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{path}: NIfTI affine is not finite")
    try:
        return Volume.from_affine(np.asarray(array), affine, convention="RAS", name=path.name)
    except ValueError as exc:
        raise InputError(f"{path}: invalid NIfTI geometry ({one_line(exc)})") from exc


def _read_itk(path: Path) -> Volume:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except Exception as exc:
        raise InputError(f"{path}: not a readable image ({one_line(exc)})") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path}: {image.GetNumberOfComponentsPerPixel()}-component (vector/colour) image; "
            "expected a scalar 3D volume"
        )
    size = tuple(image.GetSize())
    shape = _check_shape(size, path)
    dim = image.GetDimension()
    if dim > 3:  # trailing singleton axes, e.g. a 4D image with one time point
        image = image[(slice(None),) * 3 + (0,) * (dim - 3)]
    array = sitk.GetArrayFromImage(image)  # (K, J, I)
    array = np.ascontiguousarray(array.transpose(2, 1, 0)).reshape(shape)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    return Volume(array, image.GetSpacing(), image.GetOrigin(), direction, name=path.name)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _full_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".seg.nrrd", ".nii.gz"):
        if name.endswith(suffix):
            return path.name[-len(suffix) :]
    return path.suffix


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, companions: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; move it onto ``path`` when the block succeeds.

    The temporary file keeps ``path``'s suffix (writers pick the format from it). If the block
    raises, the temporary file is removed and ``path`` is left untouched. ``companions`` lists
    suffixes of extra files the writer creates beside the main one (``.raw`` for ``.mhd``); they
    are written inside a private temporary folder and moved first.

    Raises:
        MoMEError: the folder does not exist or cannot be written.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise MoMEError(f"{path}: output folder {folder} does not exist")
    try:
        workdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise MoMEError(f"{path}: cannot write to {folder} ({one_line(exc)})") from exc
    temporary = workdir / path.name
    try:
        yield temporary
        if not temporary.is_file():
            raise MoMEError(f"{path}: writer produced no file")
        for companion in companions:
            produced = workdir / (path.name[: -len(path.suffix)] + companion)
            if produced.is_file():
                os.replace(produced, folder / produced.name)
        os.replace(temporary, path)
    except OSError as exc:
        raise MoMEError(f"{path}: cannot write ({one_line(exc)})") from exc
    finally:
        for leftover in workdir.iterdir() if workdir.exists() else ():
            with contextlib.suppress(OSError):
                leftover.unlink()
        with contextlib.suppress(OSError):
            workdir.rmdir()


def _writable(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype.type not in _WRITABLE_DTYPES:
        raise ValueError(f"cannot write voxels of dtype {array.dtype}")
    return array


def write_volume(volume: Volume, path: str | os.PathLike) -> Path:
    """Write ``volume`` with its geometry; the format follows the suffix (see the module docstring).

    Voxel values are written bit-exactly (``bool`` as ``uint8``, ``float16`` as ``float32``).
    NIfTI gets the RAS affine in both sform and qform (code 1, scanner); NRRD and MetaImage store
    LPS geometry and are compressed. The write is atomic.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        MoMEError: the output folder does not exist or cannot be written.
        ValueError: the suffix or the dtype cannot be written.
    """
    path = Path(path)
    name = path.name.lower()
    kind = next((k for s, k in _FORMAT_OF_SUFFIX.items() if name.endswith(s)), None)
    if kind not in ("nifti", "itk"):
        raise ValueError(f"{path}: cannot write this file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    array = _writable(np.asarray(volume.array))
    if kind == "nifti":
        _write_nifti(volume, array, path)
    else:
        _write_itk(volume, array, path)
    logger.debug("wrote %s (%s, %s)", path, "x".join(map(str, array.shape)), array.dtype)
    return path


def _write_nifti(volume: Volume, array: np.ndarray, path: Path) -> None:
    import nibabel as nib

    affine = volume.affine_ras
    image = nib.Nifti1Image(array, affine, dtype=array.dtype)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units(xyz="mm")
    image.header.set_slope_inter(1.0, 0.0)
    with atomic_output(path) as temporary:
        nib.save(image, str(temporary))


def _write_itk(volume: Volume, array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in volume.spacing])
    image.SetOrigin([float(o) for o in volume.origin])
    image.SetDirection([float(d) for d in volume.direction.reshape(-1)])
    companions = (".zraw", ".raw") if path.name.lower().endswith((".mhd", ".nhdr")) else ()
    if path.name.lower().endswith(".nhdr"):
        companions = (".raw.gz", ".raw", ".nrrd")
    with atomic_output(path, companions=companions) as temporary:
        try:
            sitk.WriteImage(image, str(temporary), useCompression=True)
        except RuntimeError as exc:
            raise MoMEError(f"{path}: cannot write ({one_line(exc)})") from exc


def write_labelmap(labels: np.ndarray, reference: Volume, path: str | os.PathLike) -> Path:
    """Write an integer label map on exactly ``reference``'s grid.

    Args:
        labels: shape ``(I, J, K)`` = ``reference.shape``; integer or bool, or floats holding whole
            numbers. Stored as ``uint8`` when the labels fit, else ``uint16``/``int16``/``int32``.
        reference: the grid (shape, spacing, origin, direction) to write on.
        path: output file (NIfTI, NRRD or MetaImage); written atomically.
    """
    labels = np.asarray(labels)
    if labels.shape != reference.shape:
        raise ValueError(f"labels shape {labels.shape} does not match the reference grid {reference.shape}")
    if labels.dtype == np.bool_:
        labels = labels.astype(np.uint8)
    elif np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
            raise ValueError("labels must be whole numbers")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    low = int(labels.min()) if labels.size else 0
    high = int(labels.max()) if labels.size else 0
    for dtype in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            break
    else:
        raise ValueError(f"label values {low}..{high} do not fit in 32 bits")
    return write_volume(reference.with_array(labels.astype(dtype)), path)
