"""3D Slicer segmentations (``.seg.nrrd``) and label maps as lists of named binary segments.

The ``.seg.nrrd`` format itself (layers of shared label maps, segment extents, colours, the
``TerminologyEntry`` tag, geometry in LPS or RAS) is read and written by `slicerio
<https://github.com/lassoan/slicerio>`_, Python utilities for 3D Slicer's files. This module
adapts its segmentation dictionaries to the library's types: a :class:`Segmentation` is a
reference grid (a :class:`~.volume.Volume`) with a list of :class:`Segment` masks on it, and
terminology is a dictionary of codes. ``Testing/Python/test_seg_nrrd_slicer.py`` checks the files
against Slicer's own reader and writer.

Files written here cover the whole reference grid (offset ``0 0 0``); segments that overlap go to
further layers, as Slicer stores them. Files exported by Slicer may be cropped to the segments;
reading keeps the stored grid (its ``space origin`` is the position of the first stored voxel),
and :func:`align_segmentation` puts the masks on another grid.

Terminology dictionaries (used across the project)::

    {"category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
     "type": {"scheme": "SCT", "code": "10200004", "meaning": "Liver"},
     "modifier": None, "region": None, "region_modifier": None}

(``modifier``, ``region`` and ``region_modifier`` may be ``None`` or left out). In the tag they
become Slicer's seven ``~``-separated parts (context name, category, type, type modifier, anatomic
context name, anatomic region, anatomic region modifier), each code written ``scheme^code^meaning``.
"""

from __future__ import annotations

import colorsys
import logging
import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .readers import atomic_output, one_line, read_volume
from .volume import Volume

__all__ = [
    "DEFAULT_ANATOMIC_CONTEXT",
    "DEFAULT_TERMINOLOGY_CONTEXT",
    "Segment",
    "Segmentation",
    "align_segmentation",
    "read_segmentation",
    "segmentation_from_labelmap",
    "terminology_from_string",
    "terminology_to_string",
    "write_segmentation",
]

logger = logging.getLogger(__name__)

DEFAULT_TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
DEFAULT_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


@dataclass
class Segment:
    """One structure.

    Args:
        name: display name.
        mask: boolean voxels on the segmentation's reference grid, shape ``(I, J, K)``.
        color: RGB in 0..1.
        label_value: value in the label map (and the preferred value in a ``.seg.nrrd`` layer).
        terminology: DICOM terminology dictionary (see the module docstring) or ``None``.
        id: stable identifier; :func:`write_segmentation` makes one up when ``None``.
    """

    name: str
    mask: np.ndarray
    color: tuple[float, float, float]
    label_value: int = 1
    terminology: dict | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        self.mask = np.asarray(self.mask).astype(bool, copy=False)
        if self.mask.ndim != 3:
            raise ValueError(
                f"mask of segment {self.name!r} must be 3D (I, J, K), got shape {self.mask.shape}"
            )
        color = tuple(float(c) for c in self.color)
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise ValueError(f"color of segment {self.name!r} must be three values in 0..1, got {self.color}")
        self.color = color  # type: ignore[assignment]
        if int(self.label_value) != self.label_value or self.label_value < 1:
            raise ValueError(
                f"label_value of segment {self.name!r} must be a positive integer, got {self.label_value}"
            )
        self.label_value = int(self.label_value)


@dataclass
class Segmentation:
    """Segments on one grid.

    Args:
        reference: the grid (shape, spacing, origin, direction; its voxel values are not used).
        segments: masks of shape ``reference.shape``; they may overlap.
    """

    reference: Volume
    segments: list[Segment] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.segments = list(self.segments)
        for segment in self.segments:
            if segment.mask.shape != self.reference.shape:
                raise ValueError(
                    f"mask of segment {segment.name!r} has shape {segment.mask.shape}, "
                    f"the reference grid is {self.reference.shape}"
                )

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.segments]

    def __getitem__(self, name: str) -> Segment:
        for segment in self.segments:
            if segment.name == name or segment.id == name:
                return segment
        raise KeyError(f"no segment named {name!r}; have {self.names}")

    def labelmap(self, dtype: np.dtype | type | None = None) -> np.ndarray:
        """Label map ``(I, J, K)`` with each segment's ``label_value``; later segments win overlaps."""
        high = max((s.label_value for s in self.segments), default=0)
        dtype = dtype or (np.uint8 if high <= 255 else np.uint16 if high <= 65535 else np.int32)
        out = np.zeros(self.reference.shape, dtype=dtype)
        for segment in self.segments:
            out[segment.mask] = segment.label_value
        return out


# --------------------------------------------------------------------------------------------
# Terminology: the project's dictionaries <-> slicerio's
# --------------------------------------------------------------------------------------------

#: Our keys and slicerio's for the five codes of a terminology entry.
_CODE_KEYS = (("category", "category"), ("type", "type"), ("modifier", "typeModifier"),
              ("region", "anatomicRegion"), ("region_modifier", "anatomicRegionModifier"))


def _ascii(text: str) -> str:
    """NRRD headers are ASCII (pynrrd writes them so): drop accents, keep one line."""
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    return " ".join(text.split())


def _to_slicerio_terminology(terminology: Mapping[str, Any], context: str) -> dict:
    if "category" not in terminology or "type" not in terminology:
        raise ValueError(f"terminology needs 'category' and 'type' codes, got keys {sorted(terminology)}")
    entry: dict[str, Any] = {"contextName": context, "anatomicContextName": DEFAULT_ANATOMIC_CONTEXT}
    for ours, theirs in _CODE_KEYS:
        code = terminology.get(ours)
        if code:
            values = [_ascii(code.get(key, "") or "") for key in ("scheme", "code", "meaning")]
            if any(c in value for value in values for c in "~^|"):
                raise ValueError(f"terminology {ours} {values} must not contain '~', '^' or '|'")
            entry[theirs] = values
    return entry


def _from_slicerio_terminology(entry: Mapping[str, Any]) -> dict | None:
    def code(values):
        values = (list(values or []) + ["", "", ""])[:3]
        return dict(zip(("scheme", "code", "meaning"), values)) if any(v.strip() for v in values) else None

    terminology = {ours: code(entry.get(theirs)) for ours, theirs in _CODE_KEYS}
    return terminology if terminology["category"] and terminology["type"] else None


def terminology_to_string(terminology: Mapping[str, Any], context: str = DEFAULT_TERMINOLOGY_CONTEXT) -> str:
    """Encode a terminology dictionary as Slicer's ``TerminologyEntry`` tag value."""
    from slicerio.segmentation import terminology_entry_to_string

    return terminology_entry_to_string(_to_slicerio_terminology(terminology, context))


def terminology_from_string(text: str) -> dict | None:
    """Decode a ``TerminologyEntry`` tag value; ``None`` when it holds no category and type.

    Returns:
        ``{"category", "type", "modifier", "region", "region_modifier"}``; codes that the tag leaves
        empty are ``None``. Context names are not kept.
    """
    from slicerio.segmentation import terminology_entry_from_string

    try:
        return _from_slicerio_terminology(terminology_entry_from_string(text.strip()))
    except IndexError:  # fewer than Slicer's seven parts
        return None


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _unique_ids(segments: list[Segment]) -> list[str]:
    ids: list[str] = []
    taken = {s.id for s in segments if s.id}
    for n, segment in enumerate(segments):
        candidate = _ascii(segment.id) if segment.id else ""
        if not candidate or candidate in ids:
            k = n + 1
            while f"Segment_{k}" in taken or f"Segment_{k}" in ids:
                k += 1
            candidate = f"Segment_{k}"
        ids.append(candidate)
    return ids


def write_segmentation(seg: Segmentation, path: str | os.PathLike) -> Path:
    """Write a Slicer ``.seg.nrrd`` on ``seg.reference``'s grid (atomically), with slicerio.

    Non-overlapping segments share one 3D label map; overlapping ones go to further layers of a
    4D file. A segment keeps its ``label_value`` in its layer unless another segment of that layer
    has it already. Returns ``path``.

    Raises:
        MoMEError: the output folder does not exist or cannot be written.
    """
    import slicerio

    path = Path(path)
    if not path.name.lower().endswith(".nrrd"):
        raise ValueError(f"{path}: a segmentation file must end with .seg.nrrd")
    high = max([s.label_value for s in seg.segments] + [len(seg.segments)], default=1)
    dtype = np.uint8 if high <= 255 else np.uint16
    document = slicerio.create_segmentation(seg.reference.shape, seg.reference.affine_lps, dtype=dtype)
    document["containedRepresentationNames"] = ["Binary labelmap"]
    full_extent = [v for n in seg.reference.shape for v in (0, n - 1)]
    for segment, segment_id in zip(seg.segments, _unique_ids(seg.segments)):
        fields: dict[str, Any] = {"id": segment_id, "name": _ascii(segment.name) or segment_id,
                                  "nameAutoGenerated": False, "color": list(segment.color),
                                  "colorAutoGenerated": False}
        if segment.terminology:
            fields["terminology"] = _to_slicerio_terminology(segment.terminology, DEFAULT_TERMINOLOGY_CONTEXT)
        added = slicerio.add_segment(document, segment.mask, fields)
        added["extent"] = full_extent  # as Slicer writes shared layers; some releases crop a layer to it
        # slicerio numbers each layer 1, 2, ...; keep the caller's value where the layer allows it
        wanted, layer = segment.label_value, added["layer"]
        if wanted != added["labelValue"] and wanted not in {
                s["labelValue"] for s in document["segments"] if s["layer"] == layer}:
            voxels = document["voxels"]
            (voxels[layer] if voxels.ndim == 4 else voxels)[segment.mask] = wanted
            added["labelValue"] = wanted
    with atomic_output(path) as temporary:
        slicerio.write_segmentation(str(temporary), document, compression_level=6)
    logger.debug("wrote %s: %d segments in %d layer(s)", path, len(seg.segments),
                 document["voxels"].shape[0] if document["voxels"].ndim == 4 else 1)
    return path


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _default_color(index: int) -> tuple[float, float, float]:
    hue = (index * 0.618033988749895) % 1.0
    return tuple(float(c) for c in colorsys.hsv_to_rgb(hue, 0.6, 0.9))  # type: ignore[return-value]


def read_segmentation(path: str | os.PathLike, label_table: Mapping[int, Any] | None = None) -> Segmentation:
    """Read a Slicer ``.seg.nrrd`` (3D or 4D, any Slicer version) or a 3D label map.

    Args:
        path: ``.seg.nrrd`` file, or a label map (``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``, ...).
        label_table: for label maps only: ``{label_value: name}`` or ``{label_value: {"name": ...,
            "color": ..., "terminology": ..., "id": ...}}`` (see
            :func:`segmentation_from_labelmap`). Without it, every label present becomes a segment
            named ``"Label N"``.

    Returns:
        A :class:`Segmentation` on the file's grid, segments in file order.

    Raises:
        InputError: missing or unreadable file, or a header that does not describe a 3D grid.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if path.name.lower().endswith((".nrrd", ".nhdr")):
        import nrrd

        try:
            header = nrrd.read_header(str(path))
        except Exception as exc:
            raise InputError(f"{path}: not a readable NRRD file ({one_line(exc)})") from exc
        if any(re.match(r"^Segment\d+_", key) for key in header):
            return _read_seg_nrrd(path)
    volume = read_volume(path)
    if not np.issubdtype(volume.array.dtype, np.integer) and not np.array_equal(
        volume.array, np.round(volume.array)
    ):
        raise InputError(f"{path}: label map holds non-integer values")
    return segmentation_from_labelmap(volume.array.astype(np.int64), volume, label_table)


def _read_seg_nrrd(path: Path) -> Segmentation:
    import slicerio

    try:
        document = slicerio.read_segmentation(str(path))
    except Exception as exc:
        raise InputError(f"{path}: not a readable segmentation ({one_line(exc)})") from exc
    voxels = np.asarray(document["voxels"])
    if voxels.ndim not in (3, 4):
        raise InputError(f"{path}: {voxels.ndim}D image; expected 3D or 4D with one list axis")
    layers = voxels if voxels.ndim == 4 else voxels[None]
    if not np.issubdtype(layers.dtype, np.integer):
        if not np.array_equal(layers, np.round(layers)):
            raise InputError(f"{path}: segmentation voxels are not integer labels")
        layers = layers.astype(np.int64)
    try:
        reference = Volume.from_affine(np.zeros(layers.shape[1:], dtype=np.uint8), document["ijkToLPS"],
                                       name=path.name)
    except ValueError as exc:
        raise InputError(f"{path}: invalid geometry ({one_line(exc)})") from exc

    segments = []
    for order, info in enumerate(document["segments"]):
        # Slicer 4.x wrote one segment per layer, value 1, without Layer and LabelValue fields.
        old_style = voxels.ndim == 4 and "layer" not in info and "labelValue" not in info
        layer = int(info.get("layer", order if old_style else 0))
        label = int(info.get("labelValue", 1 if voxels.ndim == 4 else order + 1))
        if not 0 <= layer < layers.shape[0]:
            raise InputError(f"{path}: segment {order} refers to layer {layer}, "
                             f"the file has {layers.shape[0]}")
        color = info.get("color") or []
        terminology = info.get("terminology")
        if len(color) != 3 or not np.all(np.isfinite(color)):
            color = _default_color(order)
        segments.append(
            Segment(
                name=str(info.get("name", "")).strip() or info["id"],
                mask=layers[layer] == label,
                color=tuple(min(1.0, max(0.0, float(c))) for c in color),  # type: ignore[arg-type]
                label_value=max(1, label),
                terminology=_from_slicerio_terminology(terminology) if terminology else None,
                id=info["id"],
            )
        )
    return Segmentation(reference, segments)


def segmentation_from_labelmap(
    labels: np.ndarray, reference: Volume, label_table: Mapping[int, Any] | None = None
) -> Segmentation:
    """Split a label map ``(I, J, K)`` into one segment per label.

    Args:
        labels: integer label map on ``reference``'s grid.
        reference: the grid.
        label_table: ``{value: name}`` or ``{value: {"name", "color" (0..1 or 0..255), "terminology",
            "id"}}``; labels in the table become segments (empty ones too, in table order), labels
            missing from it are ignored. Without a table, every nonzero label present becomes a
            segment named ``"Label N"``.
    """
    labels = np.asarray(labels)
    if labels.shape != reference.shape:
        raise ValueError(f"labels shape {labels.shape} does not match the reference grid {reference.shape}")
    if label_table is None:
        label_table = {int(v): f"Label {int(v)}" for v in np.unique(labels) if v != 0}
    segments = []
    for order, (value, entry) in enumerate(label_table.items()):
        value = int(value)
        if value == 0:
            continue
        info: Mapping[str, Any] = {"name": entry} if isinstance(entry, str) else entry
        color = info.get("color")
        if color is None:
            color = _default_color(order)
        elif max(color) > 1.0:
            color = tuple(float(c) / 255.0 for c in color)
        segments.append(
            Segment(
                name=str(info.get("name") or f"Label {value}"),
                mask=labels == value,
                color=tuple(color),  # type: ignore[arg-type]
                label_value=value,
                terminology=info.get("terminology"),
                id=info.get("id"),
            )
        )
    return Segmentation(reference.with_array(np.zeros(reference.shape, dtype=np.uint8)), segments)


def align_segmentation(seg: Segmentation, reference: Volume) -> Segmentation:
    """Put every mask on ``reference``'s grid.

    Grids that differ by a whole-voxel shift (a Slicer file cropped to its segments) are padded or
    cropped exactly; any other grid is resampled by nearest neighbour in physical space.
    """
    source = seg.reference
    target = reference.with_array(np.zeros(reference.shape, dtype=np.uint8))
    shift = source.physical_to_index(reference.origin)
    same_axes = np.allclose(source.spacing, reference.spacing, rtol=1e-5) and np.allclose(
        source.direction, reference.direction, atol=1e-5
    )
    if same_axes and np.allclose(shift, np.round(shift), atol=1e-3):
        offset = np.round(shift).astype(int)  # reference index 0 is source index `offset`
        src = [slice(max(0, o), min(n, o + m)) for o, n, m in zip(offset, source.shape, reference.shape)]
        dst = [slice(s.start - o, s.stop - o) for s, o in zip(src, offset)]
        masks = []
        for segment in seg.segments:
            mask = np.zeros(reference.shape, dtype=bool)
            if all(s.stop > s.start for s in src):
                mask[tuple(dst)] = segment.mask[tuple(src)]
            masks.append(mask)
    else:
        from .geometry import resample_to_grid

        masks = [
            resample_to_grid(source.with_array(s.mask.astype(np.uint8)), target, mode="nearest").array > 0
            for s in seg.segments
        ]
    segments = [
        Segment(s.name, m, s.color, s.label_value, s.terminology, s.id) for s, m in zip(seg.segments, masks)
    ]
    return Segmentation(target, segments)
