"""DICOM series folders: find the series, order the slices, decode, rescale and regularize the voxels.

Reading happens in four steps, each a small function below.

1. **Scan** (:func:`list_dicom_series`). Every file under the folder (recursively, with or without
   an extension; ``DICOMDIR`` and hidden files are skipped) is opened with pydicom, headers only.
   Files that are not DICOM (PNG previews, PDF reports, text, empty files), that hold no positioned
   grey-scale image (structured reports, RT objects, colour captures) or that are localizers
   (``ImageType`` containing ``LOCALIZER``), derived secondary images (``ImageType`` starting
   ``DERIVED\\SECONDARY``) or secondary captures (SOP class 1.2.840.10008.5.1.4.1.1.7 and its
   multi-frame variants) are left out, with one log line per reason.
2. **Group** the images into series:

   * by ``SeriesInstanceUID``; when it is missing or empty (anonymizers do this) by the fallback
     key Study Instance UID + Frame of Reference UID + Series Number + Series Description. Such a
     series gets the id ``nouid-`` followed by 8 hex digits of a hash of that key (stable from run
     to run);
   * then one group is split where its slices disagree in orientation, rows/columns or pixel
     spacing (several reconstructions under one UID). The largest part keeps the plain id, the
     others get ``#2``, ``#3``, ... appended (``1.2.3.4#2``), in order of decreasing slice count.

   These ids are what :attr:`DicomSeries.uid` holds and what ``series_uid`` selects; an empty
   ``series_uid`` (``""``) selects the folder's only series without a UID. :func:`series_id_of`
   gives the id of the series one file belongs to (what reading one file of a folder reads).
3. **Geometry.** Slices are ordered by their position along the slice normal
   (``ImagePositionPatient`` projected on the cross product of the ``ImageOrientationPatient`` row
   and column cosines), never by file name or instance number. Two slices at the same position are
   refused, naming both files. A stack whose slices sit on a regular grid is used as it is. Two
   kinds of stack are resampled onto a regular grid with linear interpolation, with a warning:

   * a *tilted* (sheared) stack, whose slices are shifted in-plane from one to the next (gantry
     tilt), as 3D Slicer's DICOM scalar volume plugin regularizes it;
   * unevenly spaced slices (missing slices, mixed gaps).

   The output grid keeps the in-plane direction cosines and pixel spacing; its third axis is the
   slice normal with the median slice gap (adjusted so that a whole number of steps spans the
   stack); it covers every slice. Voxels that no slice covers are air (-1024 HU) for CT and the
   smallest value of the series otherwise. Interpolated values are rounded back to whole numbers
   when the series holds whole numbers.
4. **Decode.** SimpleITK's GDCM image IO decodes the pixel data of each file and applies
   ``RescaleSlope``/``RescaleIntercept``. GDCM reads every transfer syntax listed in
   :data:`SUPPORTED_TRANSFER_SYNTAXES` (native, deflated, RLE, JPEG Lossless, JPEG-LS, JPEG 2000),
   so there is one decoding path and no fallback. A file it cannot decode raises
   :class:`InputError` naming the file and its transfer syntax (name and UID).

Multi-frame (enhanced) images are read: each frame is one slice, positioned by
``PerFrameFunctionalGroupsSequence`` > ``PlanePositionSequence`` and oriented, spaced and rescaled
by the per-frame or shared functional groups (``PlaneOrientationSequence``,
``PixelMeasuresSequence``, ``PixelValueTransformationSequence``), falling back to the top-level
attributes. A multi-frame file whose geometry or rescale cannot be used becomes a series entry with
a :attr:`DicomSeries.problem`: it is listed, never chosen automatically, and raises
:class:`InputError` (saying how to export single-frame images) only when it is the series asked for.

Geometry follows the library convention (``array[i, j, k]``, LPS): ``i`` runs along the image
rows (the first ``ImageOrientationPatient`` triplet, ``PixelSpacing[1]`` apart), ``j`` along the
columns (the second triplet, ``PixelSpacing[0]`` apart), ``k`` along the slice normal from the
first slice to the last.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .volume import Volume

__all__ = [
    "DicomSeries",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "list_dicom_series",
    "read_dicom_series",
    "series_id_of",
]

logger = logging.getLogger(__name__)

#: Transfer syntaxes the decoder (GDCM through SimpleITK) is tested with, UID -> name.
SUPPORTED_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless (Process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless (Process 14, Selection Value 1)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
}

_HEADER_TAGS = [
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "ImageType",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "RescaleSlope",
    "RescaleIntercept",
    "SamplesPerPixel",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
]

#: SOP class of single-frame secondary captures; the multi-frame ones start with it plus ".".
_SECONDARY_CAPTURE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
#: ImageOrientationPatient of an image that does not say (axial).
_DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: Slices whose direction cosines differ by more than this belong to different (sub-)series.
_ORIENTATION_TOLERANCE = 1e-3
#: Largest |cos| between row and column directions taken as rounding (0.57 degrees off 90).
_PERPENDICULAR_TOLERANCE = 1e-2
#: Slices whose pixel spacings differ by more than this fraction belong to different (sub-)series.
_SPACING_RELATIVE_TOLERANCE = 1e-3
#: Two slices closer than this along the slice normal (mm) are at the same position.
_SAME_POSITION_MM = 1e-3
#: A slice may sit this fraction of a voxel off the regular grid before the stack is resampled.
_GRID_TOLERANCE_VOXELS = 0.05
#: Interpolation positions this close to a whole number are taken as that number (voxels).
_SNAP_VOXELS = 1e-6
#: Value of CT voxels outside every slice after resampling: air, in Hounsfield units.
_AIR_HU = -1024.0
#: Hex digits of the hash in the id of a series without a SeriesInstanceUID.
_FALLBACK_ID_DIGITS = 8
#: Prefix of the id of a series without a SeriesInstanceUID.
_FALLBACK_ID_PREFIX = "nouid-"
#: Separator between a series id and the number of a sub-series split off it.
_SUBSERIES_SEPARATOR = "#"
#: Longest decoder message quoted in an error.
_MAX_DETAIL_CHARS = 160
#: What a user can do with a multi-frame file that cannot be read.
_EXPORT_HINT = "export the series as single-frame images (e.g. classic CT Image Storage)"


class _UnusableHeader(Exception):
    """A DICOM image header that cannot be turned into slices (the message says why)."""


@dataclass
class _Slice:
    """One 2D image: a single-frame file, or one frame of a multi-frame file."""

    path: Path
    frame: int | None  # index of the frame in a multi-frame file, None for a single-frame file
    position: np.ndarray  # LPS position of the centre of the first pixel, mm
    orientation: tuple[float, ...]  # row cosines then column cosines
    pixel_spacing: tuple[float, float]  # (between rows, between columns) as in PixelSpacing
    rows: int
    columns: int
    slope: float
    intercept: float
    transfer_syntax: str

    @property
    def label(self) -> str:
        """The file, and the frame for a multi-frame file, for messages."""
        return str(self.path) if self.frame is None else f"{self.path} (frame {self.frame + 1})"

    def matches(self, other: _Slice) -> bool:
        """Same orientation, size and pixel spacing (within tolerance)."""
        spacing = np.asarray(self.pixel_spacing)
        return (
            (self.rows, self.columns) == (other.rows, other.columns)
            and np.allclose(self.orientation, other.orientation, rtol=0.0, atol=_ORIENTATION_TOLERANCE)
            and np.allclose(spacing, other.pixel_spacing, rtol=_SPACING_RELATIVE_TOLERANCE, atol=0.0)
        )


@dataclass
class DicomSeries:
    """One series found in a folder.

    Attributes:
        uid: the id that selects this series: its SeriesInstanceUID, ``nouid-<hash>`` for a
            series without one, with ``#2``, ``#3``, ... appended for the smaller parts of a
            series split by orientation, size or pixel spacing (see the module docstring).
        description: SeriesDescription ("" if absent).
        modality: Modality, e.g. ``"CT"``.
        series_number: SeriesNumber ("" if absent).
        files: the image files of the series (unordered).
        multi_frame: the slices come from multi-frame (enhanced) files.
        problem: why the series cannot be read (a one-line message), or None.
    """

    uid: str
    description: str
    modality: str
    series_number: str = ""
    files: list[Path] = field(default_factory=list)
    multi_frame: bool = False
    problem: str | None = None
    _slices: list[_Slice] = field(default_factory=list, repr=False)

    @property
    def num_slices(self) -> int:
        """Number of 2D images (frames count one each); 0 for an unreadable multi-frame file."""
        return len(self._slices)

    def summary(self) -> str:
        description = f" '{self.description}'" if self.description else ""
        if self.problem:
            content = "unreadable multi-frame file"
        else:
            content = f"{self.num_slices} slices" + (" in multi-frame files" if self.multi_frame else "")
        return f"{self.uid}{description} ({self.modality}, {content})"


# --------------------------------------------------------------------------------------------
# Scanning and grouping
# --------------------------------------------------------------------------------------------


def _walk_files(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.upper() == "DICOMDIR" or name.startswith("."):
                continue
            files.append(Path(root) / name)
    return files


def _read_header(path: Path) -> Any | None:
    """The header of a DICOM file (no pixel data), or None for anything that is not DICOM."""
    import pydicom

    try:
        if path.stat().st_size == 0:
            return None
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except Exception as exc:  # noqa: BLE001 - any unreadable file in a folder is skipped, not fatal
        logger.debug("%s: not a DICOM file (%s)", path, exc)
        return None


def _text(ds: Any, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _left_out_reason(ds: Any) -> str | None:
    """Why an image is not a slice of a volume (localizer, derived, capture), or None."""
    image_type = ds.get("ImageType") or []
    image_type = [
        str(v).strip().upper() for v in ([image_type] if isinstance(image_type, str) else image_type)
    ]
    sop_class = _text(ds, "SOPClassUID")
    if "LOCALIZER" in image_type:
        return "localizer image(s)"
    if image_type[:2] == ["DERIVED", "SECONDARY"]:
        return "derived secondary image(s)"
    if sop_class == _SECONDARY_CAPTURE_SOP_CLASS or sop_class.startswith(_SECONDARY_CAPTURE_SOP_CLASS + "."):
        return "secondary capture(s)"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return "colour image(s)"
    return None


def _first_item(sequence_owner: Any, keyword: str) -> Any | None:
    sequence = sequence_owner.get(keyword) if sequence_owner is not None else None
    return sequence[0] if sequence else None


def _functional_value(ds: Any, frame_item: Any, sequence: str, keyword: str) -> Any:
    """``keyword`` from the frame's functional group, else the shared one, else the top level."""
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    for group in (frame_item, shared):
        item = _first_item(group, sequence)
        if item is not None and keyword in item:
            return item.get(keyword)
    return ds.get(keyword)


def _floats(values: Any, count: int, what: str) -> tuple[float, ...]:
    numbers = tuple(float(v) for v in values)
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        raise _UnusableHeader(f"{what} has {len(numbers)} values, expected {count} finite numbers")
    return numbers


def _make_slice(path: Path, frame: int | None, ds: Any, values: dict[str, Any]) -> _Slice:
    if values["position"] is None:
        raise _UnusableHeader("no ImagePositionPatient")
    slope = values["slope"]
    intercept = values["intercept"]
    return _Slice(
        path=path,
        frame=frame,
        position=np.asarray(_floats(values["position"], 3, "ImagePositionPatient")),
        orientation=_floats(values["orientation"] or _DEFAULT_ORIENTATION, 6, "ImageOrientationPatient"),
        pixel_spacing=_floats(values["spacing"] or (1.0, 1.0), 2, "PixelSpacing"),  # type: ignore[arg-type]
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        slope=float(slope) if slope not in (None, "") else 1.0,
        intercept=float(intercept) if intercept not in (None, "") else 0.0,
        transfer_syntax=str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""),
    )


def _single_frame_slices(path: Path, ds: Any) -> list[_Slice]:
    values = {
        "position": ds.get("ImagePositionPatient"),
        "orientation": ds.get("ImageOrientationPatient"),
        "spacing": ds.get("PixelSpacing"),
        "slope": ds.get("RescaleSlope"),
        "intercept": ds.get("RescaleIntercept"),
    }
    return [_make_slice(path, None, ds, values)]


def _multi_frame_slices(path: Path, ds: Any, frames: int) -> list[_Slice]:
    """One slice per frame, from the per-frame and shared functional groups."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) != frames:
        raise _UnusableHeader(
            f"multi-frame file with {frames} frames but "
            f"{len(per_frame) if per_frame else 'no'} per-frame functional groups (frame positions)"
        )
    slices = []
    for index, item in enumerate(per_frame):
        values = {
            "position": _functional_value(ds, item, "PlanePositionSequence", "ImagePositionPatient"),
            "orientation": _functional_value(ds, item, "PlaneOrientationSequence", "ImageOrientationPatient"),
            "spacing": _functional_value(ds, item, "PixelMeasuresSequence", "PixelSpacing"),
            "slope": _functional_value(ds, item, "PixelValueTransformationSequence", "RescaleSlope"),
            "intercept": _functional_value(ds, item, "PixelValueTransformationSequence", "RescaleIntercept"),
        }
        try:
            slices.append(_make_slice(path, index, ds, values))
        except _UnusableHeader as exc:
            raise _UnusableHeader(f"frame {index + 1}: {exc}") from None
    # The decoder applies one rescale to the whole file.
    if len({(s.slope, s.intercept) for s in slices}) > 1:
        raise _UnusableHeader("frames have different RescaleSlope/RescaleIntercept")
    return slices


def _slices_of(path: Path, ds: Any) -> list[_Slice]:
    """The 2D images of one file; :class:`_UnusableHeader` when its geometry cannot be used."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        if frames > 1:
            return _multi_frame_slices(path, ds, frames)
        return _single_frame_slices(path, ds)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise _UnusableHeader(f"malformed image header ({exc})") from None


def _series_id(ds: Any) -> str:
    """SeriesInstanceUID, or ``nouid-<hash>`` of the fallback key when it is missing or empty."""
    uid = _text(ds, "SeriesInstanceUID")
    if uid:
        return uid
    key = "|".join(
        _text(ds, keyword)
        for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "SeriesNumber", "SeriesDescription")
    )
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:_FALLBACK_ID_DIGITS]
    return _FALLBACK_ID_PREFIX + digest


def _split_by_geometry(slices: list[_Slice]) -> list[list[_Slice]]:
    """Parts of one group whose slices agree in orientation, size and spacing; largest first."""
    parts: list[list[_Slice]] = []
    for item in slices:
        for part in parts:
            if part[0].matches(item):
                part.append(item)
                break
        else:
            parts.append([item])
    return sorted(parts, key=len, reverse=True)  # stable: ties stay in order of appearance


@dataclass
class _Group:
    """The images of one series id before the split by geometry."""

    description: str
    modality: str
    series_number: str
    slices: list[_Slice] = field(default_factory=list)
    unusable: dict[Path, str] = field(default_factory=dict)  # multi-frame files that cannot be read
    multi_frame: bool = False


def _series_of_group(uid: str, group: _Group) -> list[DicomSeries]:
    found = []
    def part(number: int, **fields) -> DicomSeries:
        part_uid = uid if number == 1 else f"{uid}{_SUBSERIES_SEPARATOR}{number}"
        return DicomSeries(part_uid, group.description, group.modality, group.series_number, **fields)

    for number, slices in enumerate(_split_by_geometry(group.slices), start=1):
        found.append(part(number, files=list(dict.fromkeys(s.path for s in slices)),
                          multi_frame=any(s.frame is not None for s in slices), _slices=slices))
    if len(found) > 1:
        logger.info(
            "series %s split into %d parts that differ in orientation, size or pixel spacing: %s",
            uid,
            len(found),
            "; ".join(s.summary() for s in found),
        )
    for number, (path, reason) in enumerate(group.unusable.items(), start=len(found) + 1):
        problem = f"{path}: cannot read this multi-frame file ({reason}); {_EXPORT_HINT}"
        found.append(part(number, files=[path], multi_frame=True, problem=problem))
    return found


def _collect(
    folder: Path, only_id: str | None = None
) -> tuple[dict[str, _Group], dict[str, list[Path]]]:
    """The images of ``folder`` by series id (only ``only_id`` if given) and those left out."""
    groups: dict[str, _Group] = {}
    left_out: dict[str, list[Path]] = defaultdict(list)
    for path in _walk_files(folder):
        ds = _read_header(path)
        if ds is None or "Rows" not in ds or "Columns" not in ds:
            continue  # not DICOM, or not an image (structured reports, RT objects, ...)
        uid = _series_id(ds)
        if only_id is not None and uid != only_id:
            continue
        reason = _left_out_reason(ds)
        if reason is not None:
            left_out[reason].append(path)
            continue
        group = groups.get(uid)
        if group is None:
            group = groups[uid] = _Group(
                _text(ds, "SeriesDescription"), _text(ds, "Modality"), _text(ds, "SeriesNumber")
            )
        try:
            group.slices.extend(_slices_of(path, ds))
        except _UnusableHeader as exc:
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                group.unusable[path] = str(exc)
            else:
                logger.debug("%s: left out (%s)", path, exc)
                left_out["image(s) without usable position or orientation"].append(path)
    return groups, left_out


def _scan(folder: Path) -> tuple[list[DicomSeries], dict[str, list[Path]]]:
    """The series of ``folder`` and the image files left out, by reason."""
    groups, left_out = _collect(folder)
    for reason, paths in left_out.items():
        logger.warning(
            "%s: left out %d %s, e.g. %s", folder, len(paths), reason, paths[0].relative_to(folder)
        )
    found = [series for uid, group in groups.items() for series in _series_of_group(uid, group)]
    return found, left_out


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """Scan ``folder`` (recursively) for image series; see the module docstring for the rules.

    Returns:
        The series with at least one image, in order of first appearance (files sorted by path);
        parts of a split series follow their largest part. Multi-frame files that cannot be read
        are entries with :attr:`DicomSeries.problem` set.
    """
    return _scan(Path(folder))[0]


def series_id_of(folder: str | os.PathLike, file: str | os.PathLike) -> str:
    """The id (:attr:`DicomSeries.uid`) of the series of ``folder`` that ``file`` belongs to.

    ``file`` is grouped as :func:`list_dicom_series` groups it: ``nouid-<hash>`` when its
    SeriesInstanceUID is missing or empty, ``UID#2`` when it lies in a smaller part of a split
    series. The folder's headers are read as for :func:`list_dicom_series` (no pixel data), but
    only the files with the same SeriesInstanceUID (or fallback key) as ``file`` are grouped. A
    file that is not a slice of any series (a localizer, say) gets the id of its
    SeriesInstanceUID (or fallback key).

    Raises:
        InputError: ``file`` is not a DICOM image file.
    """
    import pydicom

    folder, file = Path(folder), Path(file)
    try:
        ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a file that is not DICOM
        detail = " ".join(str(exc).split())[:_MAX_DETAIL_CHARS] or type(exc).__name__
        raise InputError(f"{file}: not a readable DICOM file ({detail})") from exc
    if "Rows" not in ds or "Columns" not in ds:
        raise InputError(f"{file}: DICOM file without an image (no Rows/Columns); expected a CT slice")
    uid = _series_id(ds)
    groups, _ = _collect(folder, only_id=uid)
    target = file.resolve()
    for series in _series_of_group(uid, groups[uid]) if uid in groups else []:
        if any(path.resolve() == target for path in series.files):
            return series.uid
    return uid


# --------------------------------------------------------------------------------------------
# Choosing a series
# --------------------------------------------------------------------------------------------


def _listing(series: list[DicomSeries]) -> str:
    return "; ".join(s.summary() for s in series)


def _find_by_uid(folder: Path, found: list[DicomSeries], series_uid: str) -> DicomSeries:
    if series_uid == "":  # a file whose SeriesInstanceUID is empty names its series so
        candidates = [s for s in found if s.uid.startswith(_FALLBACK_ID_PREFIX)]
        if len(candidates) == 1:
            return candidates[0]
    for item in found:
        if item.uid == series_uid:
            return item
    shown = series_uid or "''"
    raise InputError(f"{folder}: no series with SeriesInstanceUID {shown}; found {_listing(found)}")


def _choose_series(
    folder: Path, found: list[DicomSeries], left_out: dict[str, list[Path]], series_uid: str | None
) -> DicomSeries:
    if not found:
        counts = ", ".join(f"{len(paths)} {reason}" for reason, paths in left_out.items())
        raise InputError(
            f"{folder}: no DICOM image files found" + (f" (left out: {counts})" if counts else "")
        )
    if series_uid is not None:
        return _find_by_uid(folder, found, series_uid)
    usable = [s for s in found if s.problem is None and s.num_slices > 1]
    for item in found:
        if item not in usable:
            reason = "unreadable multi-frame file" if item.problem else "a single slice"
            logger.warning("%s: series %s not considered: %s", folder, item.uid, reason)
    ct = [s for s in usable if s.modality.upper() == "CT"]
    if len(ct) == 1:
        return ct[0]
    if len(ct) > 1:
        raise InputError(f"{folder}: {len(ct)} CT series, name one with series_uid: {_listing(ct)}")
    if len(usable) == 1:
        chosen = usable[0]
        logger.warning(
            "%s: series %s is %s, not CT", folder, chosen.uid, chosen.modality or "of unknown modality"
        )
        return chosen
    if usable:
        raise InputError(
            f"{folder}: no CT series and {len(usable)} other series, name one with series_uid: "
            f"{_listing(usable)}"
        )
    if len(found) == 1:
        return found[0]  # reading it raises its own problem (single slice, unreadable file)
    raise InputError(f"{folder}: no series that forms a 3D volume: {_listing(found)}")


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@dataclass
class _Stack:
    """Slices ordered along the slice normal, with their offsets from the first slice.

    ``depths[k]`` is slice ``k``'s distance from slice 0 along ``normal``; ``shifts[k]`` its
    in-plane offset from slice 0 in mm along (``row``, ``column``), i.e. along (``i``, ``j``).
    """

    slices: list[_Slice]
    row: np.ndarray
    column: np.ndarray
    normal: np.ndarray
    spacing_ij: np.ndarray  # mm between voxels along i (columns of the pixel matrix) and j (rows)
    depths: np.ndarray
    shifts: np.ndarray  # (K, 2)

    @property
    def direction(self) -> np.ndarray:
        return np.stack([self.row, self.column, self.normal], axis=1)

    @property
    def mean_step(self) -> float:
        return float(self.depths[-1] / (len(self.slices) - 1))


def _unit_cosines(folder: Path, series: DicomSeries) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    first = series._slices[0]
    row = np.asarray(first.orientation[:3], dtype=np.float64)
    column = np.asarray(first.orientation[3:], dtype=np.float64)
    if min(np.linalg.norm(row), np.linalg.norm(column), np.linalg.norm(np.cross(row, column))) < _ORIENTATION_TOLERANCE:
        raise InputError(f"{folder}: series {series.uid} has an invalid ImageOrientationPatient")
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    if abs(float(row @ column)) > _PERPENDICULAR_TOLERANCE:
        angle = math.degrees(math.acos(float(np.clip(row @ column, -1.0, 1.0))))
        raise InputError(f"{folder}: series {series.uid} has row and column directions {angle:.1f} degrees "
                         "apart in ImageOrientationPatient, not 90")
    # Cosines written with a few decimals are neither unit length nor quite perpendicular: take the
    # closest orthonormal pair (polar decomposition), which moves both by the same small amount.
    u, _, vt = np.linalg.svd(np.stack([row, column], axis=1), full_matrices=False)
    row, column = (u @ vt).T
    return row, column, np.cross(row, column)


def _ordered_stack(folder: Path, series: DicomSeries) -> _Stack:
    """Slices ordered along the normal; refuses single slices and duplicated positions."""
    if len(series._slices) < 2:
        raise InputError(f"{folder}: series {series.uid} has a single slice (2D image); expected a 3D volume")
    row, column, normal = _unit_cosines(folder, series)
    slices = sorted(series._slices, key=lambda s: float(normal @ s.position))
    offsets = np.stack([s.position - slices[0].position for s in slices])
    depths = offsets @ normal
    gaps = np.diff(depths)
    if np.any(gaps < _SAME_POSITION_MM):
        k = int(np.argmax(gaps < _SAME_POSITION_MM))
        raise InputError(
            f"{folder}: series {series.uid} has two slices at the same position "
            f"({float(normal @ slices[k].position):.2f} mm along the slice normal): "
            f"{slices[k].label} and {slices[k + 1].label}"
        )
    first = slices[0]
    return _Stack(
        slices=slices,
        row=row,
        column=column,
        normal=normal,
        spacing_ij=np.asarray([first.pixel_spacing[1], first.pixel_spacing[0]]),
        depths=depths,
        shifts=np.stack([offsets @ row, offsets @ column], axis=1),
    )


def _is_tilted(stack: _Stack) -> bool:
    return bool(np.max(np.abs(stack.shifts) / stack.spacing_ij) > _GRID_TOLERANCE_VOXELS)


def _is_uneven(stack: _Stack) -> bool:
    regular = np.arange(len(stack.slices)) * stack.mean_step
    return bool(np.max(np.abs(stack.depths - regular)) > _GRID_TOLERANCE_VOXELS * stack.mean_step)


def _tilt_degrees(stack: _Stack) -> tuple[float, float]:
    """Angle between the slice step and the slice normal, and the last slice's in-plane offset (mm)."""
    offset = float(np.linalg.norm(stack.shifts[-1]))
    return math.degrees(math.atan2(offset, float(stack.depths[-1]))), offset


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _transfer_syntax_text(uid: str) -> str:
    from pydicom.uid import UID

    name = SUPPORTED_TRANSFER_SYNTAXES.get(uid) or (UID(uid).name if uid else "")
    if not uid:
        return "unknown transfer syntax"
    return f"{name} ({uid})" if name and name != uid else f"unknown transfer syntax {uid}"


def _decoder_message(exc: Exception) -> str:
    """The decoder's own words from a SimpleITK exception, without source paths and addresses."""
    text = " ".join(str(exc).split())
    for marker in ("ITK ERROR:", "sitk::ERROR:"):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
    text = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", text).strip()
    return text if len(text) <= _MAX_DETAIL_CHARS else text[: _MAX_DETAIL_CHARS - 3] + "..."


def _decode_file(item: _Slice, integral: bool) -> np.ndarray:
    """Rescaled pixel values of one file, shape ``(frames, rows, columns)``."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetOutputPixelType(sitk.sitkInt32 if integral else sitk.sitkFloat32)
    reader.SetFileName(str(item.path))
    try:
        pixels = sitk.GetArrayFromImage(reader.Execute())  # GDCM applies the rescale
    except RuntimeError as exc:
        raise InputError(
            f"{item.path}: cannot decode the pixel data in transfer syntax "
            f"{_transfer_syntax_text(item.transfer_syntax)} (GDCM: {_decoder_message(exc)})"
        ) from exc
    per_frame = item.rows * item.columns
    if pixels.size % per_frame:
        raise InputError(
            f"{item.path}: decoded {pixels.size} pixel values, not a multiple of the "
            f"{item.rows}x{item.columns} image size"
        )
    return pixels.reshape(-1, item.rows, item.columns)


def _read_pixels(slices: list[_Slice]) -> np.ndarray:
    """Rescaled values of the ordered slices stacked as ``(I, J, K)`` (columns, rows, slices)."""
    first = slices[0]
    integral = all(s.slope == 1.0 and float(s.intercept).is_integer() for s in slices)
    out = np.empty((first.columns, first.rows, len(slices)), dtype=np.int32 if integral else np.float32)
    decoded: dict[Path, np.ndarray] = {}  # multi-frame files are decoded once
    for k, item in enumerate(slices):
        if item.frame is None:
            frames = _decode_file(item, integral)
        else:
            if item.path not in decoded:
                decoded[item.path] = _decode_file(item, integral)
            frames = decoded[item.path]
        if (item.frame or 0) >= frames.shape[0]:
            raise InputError(f"{item.path}: frame {item.frame + 1} is missing from the pixel data")
        out[:, :, k] = frames[item.frame or 0].T  # (rows=j, columns=i) -> (i, j)
    if integral and out.size and np.iinfo(np.int16).min <= out.min() and out.max() <= np.iinfo(np.int16).max:
        return out.astype(np.int16)
    return out


# --------------------------------------------------------------------------------------------
# Resampling a tilted or unevenly spaced stack
# --------------------------------------------------------------------------------------------


def _snap(values: np.ndarray) -> np.ndarray:
    rounded = np.round(values)
    return np.where(np.abs(values - rounded) < _SNAP_VOXELS, rounded, values)


def _interpolate_axis(values: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``values`` along ``axis`` at fractional indices ``positions``.

    Positions outside ``[0, n - 1]`` (beyond a small tolerance) give NaN.
    """
    size = values.shape[axis]
    positions = _snap(positions)
    outside = (positions < -_SNAP_VOXELS) | (positions > size - 1 + _SNAP_VOXELS)
    clipped = np.clip(positions, 0, size - 1)
    lower = np.minimum(np.floor(clipped).astype(np.int64), max(size - 2, 0))
    weight = clipped - lower
    upper = np.minimum(lower + 1, size - 1)
    shape = [1] * values.ndim
    shape[axis] = -1
    weight = weight.reshape(shape)
    result = np.take(values, lower, axis=axis) * (1.0 - weight) + np.take(values, upper, axis=axis) * weight
    result[(slice(None),) * axis + (outside,)] = np.nan
    return result


def _regular_grid(stack: _Stack) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int], float]:
    """Origin, spacing, shape and slice step of the regular grid that covers every slice."""
    median_gap = float(np.median(np.diff(stack.depths)))
    steps = max(int(round(stack.depths[-1] / median_gap)), 1)
    step = float(stack.depths[-1] / steps)
    low = stack.shifts.min(axis=0)
    extra = np.ceil((stack.shifts.max(axis=0) - low) / stack.spacing_ij - _SNAP_VOXELS).astype(int)
    first = stack.slices[0]
    shape = (first.columns + int(extra[0]), first.rows + int(extra[1]), steps + 1)
    origin = first.position + low[0] * stack.row + low[1] * stack.column
    return origin, np.asarray([*stack.spacing_ij, step]), shape, step


def _resample(stack: _Stack, pixels: np.ndarray, fill: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample the ordered slices ``pixels[i, j, k]`` onto the regular grid of :func:`_regular_grid`.

    Each output slice is perpendicular to the normal at depth ``z``: it lies between two input
    slices (weight from the depths), and its in-plane offset is interpolated the same way, so the
    value at output voxel ``(i, j)`` is the linear interpolation of the stack at its physical point.

    Returns:
        ``(array, spacing, origin)``; the array has the input's dtype (rounded when integral).
    """
    origin, spacing, shape, step = _regular_grid(stack)
    low = stack.shifts.min(axis=0)
    slice_index = np.arange(len(stack.slices), dtype=np.float64)
    values = np.empty(shape, dtype=np.float32)
    for k in range(shape[2]):
        depth = k * step
        plane = _interpolate_axis(pixels, np.asarray([np.interp(depth, stack.depths, slice_index)]), axis=2)
        shift = np.asarray([np.interp(depth, stack.depths, stack.shifts[:, axis]) for axis in range(2)])
        start = (low - shift) / stack.spacing_ij  # output voxel 0 in this slice's pixel indices
        plane = _interpolate_axis(plane[:, :, 0], np.arange(shape[0]) + start[0], axis=0)
        plane = _interpolate_axis(plane, np.arange(shape[1]) + start[1], axis=1)
        values[:, :, k] = np.where(np.isnan(plane), fill, plane)
    if np.issubdtype(pixels.dtype, np.integer):
        return np.round(values).astype(pixels.dtype), spacing, origin
    return values, spacing, origin


def _fill_value(series: DicomSeries, pixels: np.ndarray) -> float:
    if series.modality.upper() == "CT":
        return _AIR_HU
    return float(pixels.min())


def _regularize(
    folder: Path, series: DicomSeries, stack: _Stack, pixels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(array, spacing, origin)`` on a regular grid: the slices as they are, or resampled."""
    tilted, uneven = _is_tilted(stack), _is_uneven(stack)
    if not tilted and not uneven:
        spacing = np.asarray([*stack.spacing_ij, stack.mean_step])
        return pixels, spacing, stack.slices[0].position.copy()
    array, spacing, origin = _resample(stack, pixels, _fill_value(series, pixels))
    if tilted:
        angle, offset = _tilt_degrees(stack)
        logger.warning(
            "%s: series %s is a tilted stack (gantry tilt %.1f degrees, last slice %.1f mm off the "
            "slice normal); resampled onto a regular %dx%dx%d grid",
            folder,
            series.uid,
            angle,
            offset,
            *array.shape,
        )
    if uneven:
        gaps = np.diff(stack.depths)
        logger.warning(
            "%s: series %s has unevenly spaced slices (largest gap %.2f mm, median %.2f mm; missing "
            "slices?); resampled along the slice normal to %.3f mm spacing",
            folder,
            series.uid,
            float(gaps.max()),
            float(np.median(gaps)),
            float(spacing[2]),
        )
    return array, spacing, origin


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read one series of a DICOM folder as a :class:`Volume` (Hounsfield units for CT).

    Args:
        folder: searched recursively.
        series_uid: the id of the series to read (:attr:`DicomSeries.uid`: the SeriesInstanceUID,
            ``nouid-<hash>`` or a ``#n`` part, see the module docstring; ``""`` for the only series
            without a UID). Without it the folder's only CT series that forms a volume is read (or
            its only such series of any modality).

    Returns:
        ``array`` shape ``(I, J, K)`` = (columns, rows, slices), LPS geometry; ``int16`` when the
        rescaled values are whole numbers that fit, else ``int32``/``float32``. Tilted and unevenly
        spaced stacks come resampled onto a regular grid (a warning says so).

    Raises:
        InputError: empty folder, several CT series and none named (the message lists id,
            description and slice count of each), unknown ``series_uid``, single slice, two
            slices at one position, unreadable multi-frame file, undecodable pixel data.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: DICOM folder not found")
    series = _choose_series(folder, *_scan(folder), series_uid=series_uid)
    if series.problem is not None:
        raise InputError(series.problem)
    stack = _ordered_stack(folder, series)
    pixels = _read_pixels(stack.slices)
    array, spacing, origin = _regularize(folder, series, stack, pixels)
    name = folder.name + (f" ({series.description})" if series.description else "")
    logger.info("%s: read series %s, %d slices", folder, series.uid, len(stack.slices))
    return Volume(array, spacing=spacing, origin=origin, direction=stack.direction, name=name)
