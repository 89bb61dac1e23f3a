"""3D Slicer segmentations (``.seg.nrrd``) and label maps as lists of named binary segments.

A ``.seg.nrrd`` file is a NRRD image (read and written with pynrrd) plus custom header fields:

* image: 3D ``(I, J, K)`` when no segments overlap, else 4D ``(L, I, J, K)`` with a leading ``list``
  axis of *layers* (``kinds: list domain domain domain``, ``space directions: none ...``); each
  layer is a shared label map;
* ``SegmentN_ID``, ``_Name``, ``_Color`` (``r g b`` in 0..1), ``_LabelValue``, ``_Layer``,
  ``_Extent`` (``i0 i1 j0 j1 k0 k1``), ``_Tags`` (``key:value|...``, with the DICOM terminology in
  ``TerminologyEntry``), and ``Segmentation_MasterRepresentation``,
  ``Segmentation_ContainedRepresentationNames``, ``Segmentation_ReferenceImageExtentOffset``.

Files written here always cover the whole reference grid (offset ``0 0 0``). Files exported by
Slicer may be cropped to the segments; reading keeps the stored grid (its ``space origin`` is the
position of the first stored voxel), and :func:`align_segmentation` puts the masks on another grid.

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
from .volume import LPS_TO_RAS, Volume

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
_EMPTY_CODE = "^^"
_SPACES_LPS = ("left-posterior-superior", "lps")
_SPACES_RAS = ("right-anterior-superior", "ras")


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
# Terminology
# --------------------------------------------------------------------------------------------


def _ascii(text: str) -> str:
    """NRRD headers are ASCII: drop accents, replace what is left, keep one line."""
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    return " ".join(text.split())


def _code_to_string(code: Mapping[str, Any] | None) -> str:
    if not code:
        return _EMPTY_CODE
    parts = []
    for key in ("scheme", "code", "meaning"):
        value = _ascii(code.get(key, "") or "")
        if any(c in value for c in "~^|"):
            raise ValueError(f"terminology {key} {value!r} must not contain '~', '^' or '|'")
        parts.append(value)
    return "^".join(parts)


def _code_from_string(text: str) -> dict | None:
    parts = (text.split("^") + ["", "", ""])[:3]
    if not any(p.strip() for p in parts):
        return None
    return {"scheme": parts[0], "code": parts[1], "meaning": parts[2]}


def terminology_to_string(terminology: Mapping[str, Any], context: str = DEFAULT_TERMINOLOGY_CONTEXT) -> str:
    """Encode a terminology dictionary as Slicer's ``TerminologyEntry`` tag value."""
    if "category" not in terminology or "type" not in terminology:
        raise ValueError(f"terminology needs 'category' and 'type' codes, got keys {sorted(terminology)}")
    return "~".join(
        [
            context,
            _code_to_string(terminology["category"]),
            _code_to_string(terminology["type"]),
            _code_to_string(terminology.get("modifier")),
            DEFAULT_ANATOMIC_CONTEXT,
            _code_to_string(terminology.get("region")),
            _code_to_string(terminology.get("region_modifier")),
        ]
    )


def terminology_from_string(text: str) -> dict | None:
    """Decode a ``TerminologyEntry`` tag value; ``None`` when it holds no category and type.

    Returns:
        ``{"category", "type", "modifier", "region", "region_modifier"}``; codes that the tag leaves
        empty are ``None``. Context names are not kept.
    """
    parts = text.strip().split("~")
    if len(parts) < 3:
        return None
    parts += [""] * (7 - len(parts))
    category = _code_from_string(parts[1])
    kind = _code_from_string(parts[2])
    if category is None or kind is None:
        return None
    return {
        "category": category,
        "type": kind,
        "modifier": _code_from_string(parts[3]),
        "region": _code_from_string(parts[5]),
        "region_modifier": _code_from_string(parts[6]),
    }


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _pack_layers(
    segments: list[Segment], shape: tuple[int, ...]
) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Shared label-map layers: each segment goes to the first layer it does not overlap.

    A segment keeps its ``label_value`` unless another segment of the same layer already uses it;
    then it gets the smallest free value of that layer.
    """
    layers: list[np.ndarray] = []
    used: list[set[int]] = []
    placement: list[tuple[int, int]] = []
    for segment in segments:
        for index, layer in enumerate(layers):
            if not np.any(layer[segment.mask]):
                break
        else:
            layers.append(np.zeros(shape, dtype=np.int64))
            used.append(set())
            index = len(layers) - 1
        value = segment.label_value
        if value in used[index]:
            value = next(v for v in range(1, len(used[index]) + 2) if v not in used[index])
            logger.debug("segment %r stored with label %d in layer %d", segment.name, value, index)
        used[index].add(value)
        layers[index][segment.mask] = value
        placement.append((index, value))
    if not layers:
        layers.append(np.zeros(shape, dtype=np.int64))
    return layers, placement


def _extent(mask: np.ndarray) -> str:
    """``i0 i1 j0 j1 k0 k1`` of the nonzero voxels; VTK's empty extent ``0 -1 0 -1 0 -1`` if none."""
    if not mask.any():
        return "0 -1 0 -1 0 -1"
    bounds = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        bounds += [int(hit[0]), int(hit[-1])]
    return " ".join(str(b) for b in bounds)


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
    """Write a Slicer ``.seg.nrrd`` on ``seg.reference``'s grid (atomically).

    Non-overlapping segments share one 3D label map; overlapping ones go to further layers of a
    4D file. Returns ``path``.

    Raises:
        MoMEError: the output folder does not exist or cannot be written.
    """
    import nrrd

    path = Path(path)
    if not path.name.lower().endswith(".nrrd"):
        raise ValueError(f"{path}: a segmentation file must end with .seg.nrrd")
    reference = seg.reference
    layers, placement = _pack_layers(seg.segments, reference.shape)
    high = max((value for _, value in placement), default=1)
    dtype = np.uint8 if high <= 255 else np.uint16
    directions = (reference.direction * reference.spacing[None, :]).T  # row n: LPS vector of axis n
    header: dict[str, Any] = {
        "space": "left-posterior-superior",
        "space origin": reference.origin.copy(),
        "encoding": "gzip",
    }
    if len(layers) == 1:
        voxels = layers[0].astype(dtype)
        header["kinds"] = ["domain", "domain", "domain"]
        header["space directions"] = directions
    else:
        voxels = np.stack(layers).astype(dtype)
        header["kinds"] = ["list", "domain", "domain", "domain"]
        header["space directions"] = np.vstack([np.full((1, 3), np.nan), directions])
    header["Segmentation_MasterRepresentation"] = "Binary labelmap"
    header["Segmentation_ContainedRepresentationNames"] = "Binary labelmap|"
    header["Segmentation_ReferenceImageExtentOffset"] = "0 0 0"
    for n, (segment, segment_id, (layer, value)) in enumerate(
        zip(seg.segments, _unique_ids(seg.segments), placement)
    ):
        prefix = f"Segment{n}_"
        header[prefix + "ID"] = segment_id
        header[prefix + "Name"] = _ascii(segment.name) or segment_id
        header[prefix + "NameAutoGenerated"] = "0"
        header[prefix + "Color"] = " ".join(f"{c:.6g}" for c in segment.color)
        header[prefix + "ColorAutoGenerated"] = "0"
        header[prefix + "LabelValue"] = str(value)
        header[prefix + "Layer"] = str(layer)
        header[prefix + "Extent"] = _extent(segment.mask)
        if segment.terminology:
            header[prefix + "Tags"] = "TerminologyEntry:" + terminology_to_string(segment.terminology) + "|"
    with atomic_output(path) as temporary:
        nrrd.write(str(temporary), voxels, header, index_order="F", compression_level=6)
    logger.debug("wrote %s: %d segments in %d layer(s)", path, len(seg.segments), len(layers))
    return path


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _default_color(index: int) -> tuple[float, float, float]:
    hue = (index * 0.618033988749895) % 1.0
    return tuple(float(c) for c in colorsys.hsv_to_rgb(hue, 0.6, 0.9))  # type: ignore[return-value]


def _parse_color(text: str, index: int) -> tuple[float, float, float]:
    try:
        values = [float(v) for v in text.split()]
    except ValueError:
        return _default_color(index)
    if len(values) != 3 or not all(np.isfinite(values)):
        return _default_color(index)
    return tuple(min(1.0, max(0.0, v)) for v in values)  # type: ignore[return-value]


def _parse_tags(text: str) -> dict[str, str]:
    tags = {}
    for item in text.split("|"):
        if ":" in item:
            key, value = item.split(":", 1)
            tags[key.strip()] = value
    return tags


def _nrrd_geometry(header: Mapping[str, Any], path: Path) -> tuple[int | None, np.ndarray]:
    """Index of the non-spatial axis (or ``None``) and the 4x4 index-to-LPS affine of the spatial axes."""
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space not in _SPACES_LPS + _SPACES_RAS:
        raise InputError(f"{path}: unsupported NRRD space {space!r}; expected left-posterior-superior")
    directions = np.asarray(header.get("space directions"), dtype=np.float64)
    dimension = int(header["dimension"])
    kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * dimension)]
    spatial = (
        [n for n in range(dimension) if np.all(np.isfinite(directions[n]))] if directions.ndim == 2 else []
    )
    if len(spatial) != 3:
        raise InputError(f"{path}: expected 3 spatial axes, found {len(spatial)} (kinds {' '.join(kinds)})")
    extra = [n for n in range(dimension) if n not in spatial]
    if len(extra) > 1:
        raise InputError(f"{path}: {dimension}D image; expected 3D or 4D with one list axis")
    affine = np.eye(4)
    affine[:3, :3] = directions[spatial].T
    affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    if space in _SPACES_RAS:
        affine[:3, :] = LPS_TO_RAS @ affine[:3, :]
    return (extra[0] if extra else None), affine


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
    import nrrd

    try:
        voxels, header = nrrd.read(str(path), index_order="F")
    except Exception as exc:
        raise InputError(f"{path}: not a readable segmentation ({one_line(exc)})") from exc
    list_axis, affine = _nrrd_geometry(header, path)
    voxels = np.asarray(voxels)
    if list_axis is None:
        layers = voxels[None]
    else:
        layers = np.moveaxis(voxels, list_axis, 0)
    if not np.issubdtype(layers.dtype, np.integer):
        if not np.array_equal(layers, np.round(layers)):
            raise InputError(f"{path}: segmentation voxels are not integer labels")
        layers = layers.astype(np.int64)
    try:
        reference = Volume.from_affine(np.zeros(layers.shape[1:], dtype=np.uint8), affine, name=path.name)
    except ValueError as exc:
        raise InputError(f"{path}: invalid geometry ({one_line(exc)})") from exc

    fields: dict[int, dict[str, str]] = {}
    for key, value in header.items():
        match = re.match(r"^Segment(\d+)_(.+)$", key)
        if match:
            fields.setdefault(int(match.group(1)), {})[match.group(2)] = str(value)
    single_voxel = layers[0].size == 1  # Slicer's placeholder for a segmentation without voxels
    segments = []
    for order, index in enumerate(sorted(fields)):
        info = fields[index]
        layer = int(info.get("Layer", index if list_axis is not None and "LabelValue" not in info else 0))
        label = int(info.get("LabelValue", 1 if list_axis is not None else order + 1))
        if not 0 <= layer < layers.shape[0]:
            raise InputError(
                f"{path}: segment {index} refers to layer {layer}, the file has {layers.shape[0]}"
            )
        mask = np.zeros(layers.shape[1:], dtype=bool) if single_voxel else layers[layer] == label
        tags = _parse_tags(info.get("Tags", ""))
        terminology = (
            terminology_from_string(tags["TerminologyEntry"]) if "TerminologyEntry" in tags else None
        )
        segment_id = info.get("ID") or f"Segment_{index + 1}"
        segments.append(
            Segment(
                name=info.get("Name", "").strip() or segment_id,
                mask=mask,
                color=_parse_color(info.get("Color", ""), order),
                label_value=max(1, label),
                terminology=terminology,
                id=segment_id,
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
