"""Write DICOM test data with pydicom: CT series in any transfer syntax, sheared stacks, enhanced CT.

Shared by the DICOM reader tests and the end-to-end tests. Everything is written from arrays in the
library convention: ``array[i, j, k]`` with LPS geometry (see ``MoMESegmentationLib.io.volume``):
``i`` runs along the row cosines (the columns of each pixel matrix), ``j`` along the column cosines
(the rows of the pixel matrix), ``k`` from slice to slice. Values are Hounsfield units; the files
store ``(HU - intercept) / slope`` as signed 16-bit integers.

Encoders (all real, all offline): pydicom's own RLE encoder; JPEG-LS through pyjpegls (CharLS);
JPEG 2000 through pylibjpeg-openjpeg (OpenJPEG); JPEG Lossless SV1 through GDCM, as bundled with
SimpleITK (its DICOM writer's "JPEG" compressor), whose encapsulated frames are moved into the
pydicom dataset; deflate through pydicom's writer.

Main entry points:

* :func:`example_ct` -- a small crop of the bundled real CT as a :class:`Volume`.
* :func:`write_ct_series` -- one file per slice, any transfer syntax, file names by SOP Instance
  UID, index or shuffled, Series Instance UID generated, given, empty or missing.
* :func:`write_enhanced_ct` -- one multi-frame (Enhanced CT) file.
* :func:`write_dicomdir` -- a DICOMDIR file set (nested folders) from written files.
* :func:`write_junk` -- the non-DICOM files PACS exports carry (PNG preview, PDF, text, empty).
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from MoMESegmentationLib.io.volume import Volume

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
    "SECONDARY_CAPTURE_IMAGE_STORAGE",
    "MISSING",
    "TRANSFER_SYNTAXES",
    "WrittenSeries",
    "example_ct",
    "write_ct_series",
    "write_enhanced_ct",
    "write_dicomdir",
    "write_junk",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
FRAME_OF_REFERENCE_UID = "1.2.826.0.1.3680043.8.498.2"

#: Transfer syntaxes :func:`write_ct_series` can write, short name -> UID.
TRANSFER_SYNTAXES = {
    "implicit": "1.2.840.10008.1.2",
    "explicit": "1.2.840.10008.1.2.1",
    "deflated": "1.2.840.10008.1.2.1.99",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg_lossless_sv1": "1.2.840.10008.1.2.4.70",
    "jpeg_ls": "1.2.840.10008.1.2.4.80",
    "jpeg_ls_near": "1.2.840.10008.1.2.4.81",
    "j2k_lossless": "1.2.840.10008.1.2.4.90",
    "j2k": "1.2.840.10008.1.2.4.91",
}
_NATIVE = {TRANSFER_SYNTAXES[name] for name in ("implicit", "explicit", "deflated")}
_PYDICOM_ENCODED = {
    TRANSFER_SYNTAXES[name] for name in ("rle", "jpeg_ls", "jpeg_ls_near", "j2k_lossless", "j2k")
}

#: Default geometry of a plain array: spacing (i, j, k) mm, origin LPS mm.
DEFAULT_SPACING = (0.7, 0.8, 2.5)
DEFAULT_ORIGIN = (-120.0, 35.5, 400.0)
#: Where :func:`example_ct` crops the bundled CT by default (voxel index of the first corner).
EXAMPLE_CT_START = (20, 10, 40)


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: Pass as ``series_uid`` to write files without a SeriesInstanceUID element at all.
MISSING = _Missing()


@dataclass
class WrittenSeries:
    """What :func:`write_ct_series` / :func:`write_enhanced_ct` wrote.

    Attributes:
        paths: the files, in slice order ``k`` (one file for enhanced CT).
        series_uid: the SeriesInstanceUID written ("" if empty, None if missing).
        volume: the HU values and regular geometry that were written (for sheared or irregular
            ``positions`` only the values; the geometry is then that of the first slice).
        positions: ``(K, 3)`` LPS position of each slice's first pixel.
    """

    paths: list[Path]
    series_uid: str | None
    volume: Volume
    positions: np.ndarray


@functools.lru_cache(maxsize=1)
def _bundled_ct() -> Volume:
    from MoMESegmentationLib.io.readers import read_volume
    from MoMESegmentationLib.resources import resource_path

    return read_volume(resource_path("SampleData", "example_ct.nii.gz"))


def example_ct(shape=(64, 64, 20), start=EXAMPLE_CT_START) -> Volume:
    """A crop of the bundled real CT (``Resources/SampleData/example_ct.nii.gz``), HU as int16.

    The geometry is the crop's own (3 mm voxels, LPS); ``start`` is the voxel index of its corner.
    """
    ct = _bundled_ct()
    start = np.asarray(start)
    window = tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, shape, strict=True))
    array = ct.array[window].astype(np.int16)
    if array.shape != tuple(shape):
        raise ValueError(f"crop {shape} at {tuple(start)} leaves the {ct.shape} CT")
    origin = ct.index_to_physical(start)
    return Volume(array, spacing=ct.spacing, origin=origin, direction=ct.direction, name="example_ct crop")


def _as_volume(image, spacing, origin, direction) -> Volume:
    if isinstance(image, Volume):
        return image
    return Volume(
        np.asarray(image),
        spacing=DEFAULT_SPACING if spacing is None else spacing,
        origin=DEFAULT_ORIGIN if origin is None else origin,
        direction=np.eye(3) if direction is None else direction,
    )


def _stored_values(hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    stored = (np.asarray(hu, dtype=np.float64) - intercept) / slope
    rounded = np.rint(stored)
    if not np.allclose(stored, rounded, atol=1e-6):
        raise ValueError("(HU - intercept) / slope must be whole numbers")
    if rounded.min() < np.iinfo(np.int16).min or rounded.max() > np.iinfo(np.int16).max:
        raise ValueError("stored values do not fit int16")
    return rounded.astype(np.int16)


def _base_dataset(sop_class_uid: str, transfer_syntax: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "PHANTOM"
    ds.PatientName = "Phantom^CT"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
    return ds


def _set_series(ds, series_uid, study_uid, frame_of_reference_uid, series_number, description, modality):
    if series_uid is not MISSING:
        ds.SeriesInstanceUID = series_uid
    if study_uid is not None:
        ds.StudyInstanceUID = study_uid
    if frame_of_reference_uid is not None:
        ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.Modality = modality


def _set_pixel_module(ds, rows: int, columns: int) -> None:
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1


def _gdcm_jpeg_lossless_frame(pixels: np.ndarray) -> bytes:
    """JPEG Lossless SV1 codestream of one ``(rows, columns)`` int16 image, encoded by GDCM."""
    import pydicom
    import SimpleITK as sitk
    from pydicom.encaps import generate_frames

    with tempfile.TemporaryDirectory() as scratch:
        path = str(Path(scratch) / "frame.dcm")
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("GDCMImageIO")
        writer.SetFileName(path)
        writer.SetUseCompression(True)
        writer.SetCompressor("JPEG")
        writer.Execute(sitk.GetImageFromArray(pixels))
        written = pydicom.dcmread(path)
    if written.file_meta.TransferSyntaxUID != TRANSFER_SYNTAXES["jpeg_lossless_sv1"]:
        raise RuntimeError(f"GDCM wrote {written.file_meta.TransferSyntaxUID}, not JPEG Lossless SV1")
    return next(generate_frames(written.PixelData, number_of_frames=1))


def _encode(ds, pixels: np.ndarray, transfer_syntax: str, encode_options: dict) -> None:
    """Put ``pixels`` (rows, columns) or (frames, rows, columns) into ``ds`` in ``transfer_syntax``."""
    from pydicom.encaps import encapsulate

    pixels = np.ascontiguousarray(pixels, dtype="<i2")
    if transfer_syntax in _NATIVE:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.PixelData = pixels.tobytes()
    elif transfer_syntax in _PYDICOM_ENCODED:
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        ds.compress(transfer_syntax, pixels, generate_instance_uid=False, **encode_options)
    elif transfer_syntax == TRANSFER_SYNTAXES["jpeg_lossless_sv1"]:
        frames = pixels.reshape(-1, *pixels.shape[-2:])
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.PixelData = encapsulate([_gdcm_jpeg_lossless_frame(frame) for frame in frames])
        ds["PixelData"].VR = "OB"
    else:
        raise ValueError(f"no encoder for transfer syntax {transfer_syntax}")


def _file_name(kind: str, ds, index: int, shuffled: int, token: str) -> str:
    if kind == "sop_uid":
        return str(ds.SOPInstanceUID)
    if kind == "index":
        return f"{index + 1:04d}.dcm"
    if kind == "shuffled":
        return f"IM{token}_{shuffled:04d}"
    raise ValueError(f"file_names must be 'sop_uid', 'index' or 'shuffled', not {kind!r}")


def write_ct_series(
    folder: str | Path,
    image,
    *,
    spacing=None,
    origin=None,
    direction=None,
    positions=None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    transfer_syntax: str = TRANSFER_SYNTAXES["explicit"],
    encode_options: dict | None = None,
    series_uid=None,
    study_uid: str | None = STUDY_UID,
    frame_of_reference_uid: str | None = FRAME_OF_REFERENCE_UID,
    series_number: int = 1,
    description: str = "Abdomen",
    modality: str = "CT",
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    sop_class_uid: str = CT_IMAGE_STORAGE,
    file_names: str = "shuffled",
    seed: int = 0,
) -> WrittenSeries:
    """Write ``image[:, :, k]`` as one single-frame DICOM file per slice ``k``.

    Args:
        folder: created if needed; files of several series may share it.
        image: a :class:`Volume` (HU values and geometry) or an ``(I, J, K)`` array of HU values
            (then ``spacing``, ``origin``, ``direction`` give the geometry, defaulting to
            :data:`DEFAULT_SPACING`, :data:`DEFAULT_ORIGIN` and axial).
        positions: ``(K, 3)`` LPS positions of each slice's first pixel, to write a sheared or
            unevenly spaced stack; default: the regular grid of the volume.
        slope, intercept: RescaleSlope/RescaleIntercept; ``(HU - intercept) / slope`` must be
            whole numbers that fit int16.
        transfer_syntax: a UID from :data:`TRANSFER_SYNTAXES` (JPEG 2000 needs slices of at least
            32x32 pixels: OpenJPEG's default resolution levels do not fit smaller ones).
        encode_options: passed to pydicom's ``Dataset.compress`` (``jls_error=2``,
            ``j2k_cr=[20]``, ...).
        series_uid: None generates one; ``""`` writes it present but empty; :data:`MISSING` leaves
            the element out.
        study_uid, frame_of_reference_uid: None leaves the element out.
        image_type: ImageType values (``("ORIGINAL", "PRIMARY", "LOCALIZER")`` for a scout).
        file_names: ``"sop_uid"`` (the SOP Instance UID, no extension, as anonymizers name files),
            ``"index"`` (``0001.dcm`` in slice order) or ``"shuffled"`` (random order and names
            without extension). Instance numbers are always shuffled.
        seed: for the shuffling.

    Returns:
        The written paths in slice order, the series UID and the volume written.
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    volume = _as_volume(image, spacing, origin, direction)
    stored = _stored_values(volume.array, slope, intercept)
    rng = np.random.default_rng(seed)
    if series_uid is None:
        series_uid = generate_uid()
    size_i, size_j, size_k = stored.shape
    if positions is None:
        positions = np.stack([volume.index_to_physical([0, 0, k]) for k in range(size_k)])
    positions = np.asarray(positions, dtype=np.float64).reshape(size_k, 3)
    row, column = volume.direction[:, 0], volume.direction[:, 1]
    shuffled = rng.permutation(size_k)
    instance_numbers = rng.permutation(size_k) + 1
    token = generate_uid()[-6:]
    paths = []
    for k in range(size_k):
        ds = _base_dataset(sop_class_uid, TRANSFER_SYNTAXES["explicit"])
        _set_series(ds, series_uid, study_uid, frame_of_reference_uid, series_number, description, modality)
        ds.ImageType = list(image_type)
        ds.InstanceNumber = int(instance_numbers[k])
        ds.ImagePositionPatient = [round(float(v), 6) for v in positions[k]]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row, *column)]
        ds.PixelSpacing = [float(volume.spacing[1]), float(volume.spacing[0])]
        ds.SliceThickness = float(volume.spacing[2])
        _set_pixel_module(ds, rows=size_j, columns=size_i)
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.RescaleType = "HU"
        _encode(ds, stored[:, :, k].T, transfer_syntax, encode_options or {})
        path = folder / _file_name(file_names, ds, k, int(shuffled[k]), token)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    written_uid = None if series_uid is MISSING else str(series_uid)
    return WrittenSeries(paths, written_uid, volume, positions)


def _item(**values):
    from pydicom.dataset import Dataset

    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def write_enhanced_ct(
    folder: str | Path,
    image,
    *,
    spacing=None,
    origin=None,
    direction=None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    rescale_in: str = "shared",
    frame_positions: bool = True,
    series_uid=None,
    description: str = "Enhanced",
    file_name: str = "enhanced.dcm",
    seed: int = 0,
) -> WrittenSeries:
    """Write ``image`` as one Enhanced CT multi-frame file, frames in shuffled order.

    Geometry goes where Enhanced CT keeps it: PixelMeasures and PlaneOrientation in the
    SharedFunctionalGroupsSequence, one PlanePosition per frame in the
    PerFrameFunctionalGroupsSequence.

    Args:
        image, spacing, origin, direction, slope, intercept, series_uid: as for
            :func:`write_ct_series`.
        rescale_in: where the rescale goes: ``"shared"`` functional group, ``"per_frame"``
            groups or ``"top"`` level attributes.
        frame_positions: False leaves out the per-frame functional groups (an unusable file).
    """
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    volume = _as_volume(image, spacing, origin, direction)
    stored = _stored_values(volume.array, slope, intercept)
    size_i, size_j, size_k = stored.shape
    order = np.random.default_rng(seed).permutation(size_k)  # frame f holds slice order[f]
    positions = np.stack([volume.index_to_physical([0, 0, k]) for k in range(size_k)])
    series_uid = generate_uid() if series_uid is None else series_uid
    ds = _base_dataset(ENHANCED_CT_IMAGE_STORAGE, TRANSFER_SYNTAXES["explicit"])
    _set_series(ds, series_uid, STUDY_UID, FRAME_OF_REFERENCE_UID, 1, description, "CT")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = size_k
    _set_pixel_module(ds, rows=size_j, columns=size_i)
    rescale = _item(RescaleIntercept=intercept, RescaleSlope=slope, RescaleType="HU")
    shared = _item(
        PixelMeasuresSequence=Sequence(
            [
                _item(
                    PixelSpacing=[float(volume.spacing[1]), float(volume.spacing[0])],
                    SliceThickness=float(volume.spacing[2]),
                )
            ]
        ),
        PlaneOrientationSequence=Sequence(
            [_item(ImageOrientationPatient=[round(float(v), 8) for v in volume.direction[:, :2].T.ravel()])]
        ),
    )
    if rescale_in == "shared":
        shared.PixelValueTransformationSequence = Sequence([rescale])
    elif rescale_in == "top":
        ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    if frame_positions:
        frames = []
        for k in order:
            frame = _item(
                PlanePositionSequence=Sequence(
                    [_item(ImagePositionPatient=[round(float(v), 6) for v in positions[k]])]
                ),
                FrameContentSequence=Sequence([_item(InStackPositionNumber=int(k) + 1)]),
            )
            if rescale_in == "per_frame":
                frame.PixelValueTransformationSequence = Sequence([rescale])
            frames.append(frame)
        ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    _encode(ds, np.stack([stored[:, :, k].T for k in order]), TRANSFER_SYNTAXES["explicit"], {})
    path = folder / file_name
    ds.save_as(path, enforce_file_format=True)
    return WrittenSeries([path], str(series_uid), volume, positions)


def write_dicomdir(folder: str | Path, files: list[Path]) -> list[Path]:
    """Copy ``files`` into a DICOM file set at ``folder``: a DICOMDIR plus nested folders.

    pydicom's FileSet lays the files out as ``PT000000/ST000000/SE000000/IM000000`` (no
    extensions) and writes the DICOMDIR that indexes them. Returns the image files written.
    """
    from pydicom.fileset import FileSet

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    file_set = FileSet()
    for path in files:
        file_set.add(path)
    file_set.write(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "DICOMDIR")


#: A 1x1 grey PNG, as PACS exports put beside the images as previews.
_PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010800000000"
    "3a7e9b550000000a49444154789c6360000000020001e221bc330000000049454e44ae426082"
)


def write_junk(folder: str | Path) -> list[Path]:
    """The non-DICOM files of real exports: a PNG preview, a PDF report, a text file, an empty file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    junk = {
        "preview.png": _PNG_1X1,
        "report.pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
        "README.TXT": b"Exported by PACS. Not for diagnostic use.\n",
        "EMPTY": b"",
    }
    paths = []
    for name, content in junk.items():
        (folder / name).write_bytes(content)
        paths.append(folder / name)
    return paths
