"""DICOM series folders: find the series, order the slices, decode and rescale the voxels.

pydicom reads the headers (series grouping, slice geometry, rescale), SimpleITK (GDCM) decodes the
pixel data of each slice, including compressed transfer syntaxes. Slices are ordered by their
position along the slice normal (``ImagePositionPatient`` projected on the cross product of the
``ImageOrientationPatient`` row and column cosines), never by file name or instance number.

Geometry follows the library convention (``array[i, j, k]``, LPS): ``i`` runs along the image
rows (the first ``ImageOrientationPatient`` triplet, ``PixelSpacing[1]`` apart), ``j`` along the
columns (the second triplet, ``PixelSpacing[0]`` apart), ``k`` along the slice normal from the
first slice to the last.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from .volume import Volume

__all__ = ["DicomSeries", "list_dicom_series", "read_dicom_series"]

logger = logging.getLogger(__name__)

_HEADER_TAGS = [
    "SeriesInstanceUID",
    "SeriesDescription",
    "Modality",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "RescaleSlope",
    "RescaleIntercept",
    "ImageType",
    "SamplesPerPixel",
]

#: Relative deviation of slice gaps from their median above which the series is refused.
_MAX_GAP_DEVIATION = 0.1


@dataclass
class _Slice:
    path: Path
    position: np.ndarray
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slope: float
    intercept: float


@dataclass
class DicomSeries:
    """One series found in a folder.

    Attributes:
        uid: SeriesInstanceUID.
        description: SeriesDescription ("" if absent).
        modality: Modality, e.g. ``"CT"``.
        files: the image files of the series (unordered).
    """

    uid: str
    description: str
    modality: str
    files: list[Path] = field(default_factory=list)
    _slices: list[_Slice] = field(default_factory=list, repr=False)

    @property
    def num_slices(self) -> int:
        return len(self.files)

    def summary(self) -> str:
        description = f" '{self.description}'" if self.description else ""
        return f"{self.uid}{description} ({self.modality}, {self.num_slices} slices)"


def _walk_files(folder: Path) -> list[Path]:
    files = []
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            if name.upper() == "DICOMDIR" or name.startswith("."):
                continue
            files.append(Path(root) / name)
    return files


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """Scan ``folder`` (recursively) for image series; non-DICOM and non-image files are skipped.

    Returns:
        The series with at least one image slice, in order of first appearance.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    series: dict[str, DicomSeries] = {}
    for path in _walk_files(folder):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError):
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid or "Rows" not in ds or "ImagePositionPatient" not in ds:
            continue  # not an image with a position (structured reports, RT objects, ...)
        try:
            item = _Slice(
                path=path,
                position=np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64),
                orientation=tuple(float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])),
                pixel_spacing=tuple(float(v) for v in ds.get("PixelSpacing", [1.0, 1.0])),  # type: ignore
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
                intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            logger.warning("%s: skipped, malformed image header (%s)", path, exc)
            continue
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(
                f"{path}: multi-frame (enhanced) DICOM is not supported; "
                "export the series as single-frame images"
            )
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            continue  # colour images (secondary captures)
        if uid not in series:
            series[uid] = DicomSeries(
                uid, str(ds.get("SeriesDescription", "")).strip(), str(ds.get("Modality", "")).strip()
            )
        series[uid].files.append(path)
        series[uid]._slices.append(item)
    return list(series.values())


def _choose_series(folder: Path, found: list[DicomSeries], series_uid: str | None) -> DicomSeries:
    if not found:
        raise InputError(f"{folder}: no DICOM image files found")
    if series_uid is not None:
        for item in found:
            if item.uid == series_uid:
                return item
        listing = "; ".join(s.summary() for s in found)
        raise InputError(f"{folder}: no series with SeriesInstanceUID {series_uid}; found {listing}")
    ct = [s for s in found if s.modality.upper() == "CT"]
    if len(ct) == 1:
        return ct[0]
    if len(ct) > 1:
        listing = "; ".join(s.summary() for s in ct)
        raise InputError(f"{folder}: {len(ct)} CT series, name one with series_uid: {listing}")
    if len(found) == 1:
        logger.warning(
            "%s: series %s is %s, not CT", folder, found[0].uid, found[0].modality or "of unknown modality"
        )
        return found[0]
    listing = "; ".join(s.summary() for s in found)
    raise InputError(
        f"{folder}: no CT series and {len(found)} other series, name one with series_uid: {listing}"
    )


def _geometry(folder: Path, series: DicomSeries) -> tuple[list[_Slice], np.ndarray, np.ndarray, np.ndarray]:
    """Ordered slices, spacing, origin and direction of one series."""
    slices = series._slices
    # Localizers and stray slices: keep the orientation most slices share.
    orientation, _ = Counter(tuple(np.round(s.orientation, 4)) for s in slices).most_common(1)[0]
    kept = [s for s in slices if tuple(np.round(s.orientation, 4)) == orientation]
    if len(kept) < len(slices):
        logger.warning("%s: ignored %d slice(s) with another orientation", folder, len(slices) - len(kept))
    sizes = {(s.rows, s.columns) for s in kept}
    if len(sizes) > 1:
        raise InputError(f"{folder}: series {series.uid} mixes slice sizes {sorted(sizes)}")
    row = np.asarray(kept[0].orientation[:3])
    column = np.asarray(kept[0].orientation[3:])
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(column) < 1e-6:
        raise InputError(f"{folder}: series {series.uid} has an invalid ImageOrientationPatient")
    row /= np.linalg.norm(row)
    column /= np.linalg.norm(column)
    normal = np.cross(row, column)
    normal /= np.linalg.norm(normal)
    kept.sort(key=lambda s: float(normal @ s.position))
    if len(kept) < 2:
        raise InputError(f"{folder}: series {series.uid} has a single slice (2D image); expected a 3D volume")
    depth = np.asarray([normal @ s.position for s in kept])
    gaps = np.diff(depth)
    if np.any(gaps < 1e-4):
        raise InputError(f"{folder}: series {series.uid} has several slices at the same position")
    median = float(np.median(gaps))
    if np.max(np.abs(gaps - median)) > _MAX_GAP_DEVIATION * median:
        raise InputError(
            f"{folder}: series {series.uid} has unevenly spaced slices "
            f"({gaps.min():.3g} to {gaps.max():.3g} mm; missing slices?)"
        )
    spacing_k = float((depth[-1] - depth[0]) / (len(kept) - 1))
    direction = np.stack([row, column, normal], axis=1)
    spacing = np.asarray([kept[0].pixel_spacing[1], kept[0].pixel_spacing[0], spacing_k])
    return kept, spacing, kept[0].position.copy(), direction


def _read_pixels(folder: Path, slices: list[_Slice]) -> np.ndarray:
    """Stored values of every slice, rescaled, stacked as ``(I, J, K)``."""
    import SimpleITK as sitk

    first = slices[0]
    integral = all(s.slope == 1.0 and float(s.intercept).is_integer() for s in slices)
    out = np.empty((first.columns, first.rows, len(slices)), dtype=np.float32 if not integral else np.int32)
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetOutputPixelType(sitk.sitkInt32 if integral else sitk.sitkFloat32)
    for k, item in enumerate(slices):
        reader.SetFileName(str(item.path))
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            text = " ".join(str(exc).split())[-160:]
            raise InputError(f"{item.path}: cannot decode DICOM pixel data ({text})") from exc
        pixels = sitk.GetArrayFromImage(image).reshape(item.rows, item.columns)  # (rows=j, columns=i)
        # GDCM applies RescaleSlope/RescaleIntercept while decoding.
        out[:, :, k] = pixels.T
    if integral and out.size and np.iinfo(np.int16).min <= out.min() and out.max() <= np.iinfo(np.int16).max:
        return out.astype(np.int16)
    return out


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read one series of a DICOM folder as a :class:`Volume` (Hounsfield units for CT).

    Args:
        folder: searched recursively.
        series_uid: the SeriesInstanceUID to read. Without it the folder's only CT series is read
            (or its only series of any modality).

    Returns:
        ``array`` shape ``(I, J, K)`` = (columns, rows, slices), ``int16`` when the rescaled values
        are whole numbers that fit, else ``int32``/``float32``.

    Raises:
        InputError: empty folder, several CT series and none named (the message lists UID,
            description and slice count of each), unknown ``series_uid``, single slice, unevenly
            spaced or duplicated slices, undecodable pixel data.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: DICOM folder not found")
    found = list_dicom_series(folder)
    series = _choose_series(folder, found, series_uid)
    slices, spacing, origin, direction = _geometry(folder, series)
    array = _read_pixels(folder, slices)
    name = folder.name + (f" ({series.description})" if series.description else "")
    logger.info("%s: read series %s, %d slices", folder, series.uid, len(slices))
    return Volume(array, spacing=spacing, origin=origin, direction=direction, name=name)
