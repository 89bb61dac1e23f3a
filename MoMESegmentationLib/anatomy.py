"""Which body regions a CT shows, and whether a mask is anatomically plausible in it.

A network asked for the liver in a head CT often returns *something*, with high confidence. This
module catches such gross errors for every model alike, without looking at the network: it reads
the field of view off the scan itself and compares each mask with its structure's priors
(:attr:`~MoMESegmentationLib.vocabulary.Structure.regions` and
:attr:`~MoMESegmentationLib.vocabulary.Structure.volume_ml` from ``Resources/vocabulary.json``).

Field of view (:func:`estimate_coverage`)
-----------------------------------------

The scan is reduced to a coarse copy: axial slices about 4 mm apart (or the scan's own, when
thicker) with pixels of about 3 mm (block means of samples about 1.5 mm apart, plus whether any
sample in a block is above 250 or 600 HU, so that thin cortical bone is not lost), ordered from
head to feet along the physical superior-inferior axis, so the answer does not depend on how the
voxels are stored. It takes about 0.1 s for a 512 x 512 x 400 CT. Landmarks, all in Hounsfield
units:

* **Body outline**: per slice, the parts above -500 HU after a small opening (which removes thin
  table shells and cables), at least 15 cm2 and 40 mm deep front to back (table tops are
  thinner) and at least 30 % of the largest part (two thighs count, an arm beside the body does
  not), holes filled.
* **Lungs** (define the *chest*): 3D regions below -500 HU enclosed by the body outline, of at
  least 20 mL, whose median is above -920 HU and of which at most 20 % is below -950 HU. Aerated
  lung is about -850 HU; gas in bowel, stomach, airways and sinuses is about -1000 HU, and the
  trachea, sinuses and most gas pockets are small.
* **Skull** (defines the *head*): a slice with no lung and a cross-section under 450 cm2 where
  bone (> 250 HU, gaps up to about a pixel closed) forms a closed ring around soft tissue (median
  -30 to 120 HU: brain, CSF) filling at least 45 % of the cross-section; at least two such
  slices 10 mm apart.
* **Bony pelvis** (defines the *pelvis*): bone lateral to the midline (beyond 12 % of the body
  width from its centre) that belongs to a large 3D part (at least 25 mL on one side: hip bones,
  femurs; not rib tips) reaching no slice with lung (not ribs or scapulae). Slices with at least
  3 cm2 of it on both sides, including 0.3 cm2 of cortex above 600 HU per side (contrast in
  kidneys, vessels and bowel rarely gets there), start a run that grows up and down through
  slices with at least 0.8 cm2 per side and a trace of cortex (iliac crests, ischia). The lowest
  run at least 30 mm long (or ending at the bottom of the scan or at the legs) that lies at least
  40 mm below the lungs and 250 mm below the skull counts.
* **Legs**: at the bottom of the scan, slices without lung where the body is two separate parts
  (thighs, knees) or where no bone is near the midline and each side has one bone (a femur).

Regions between landmarks follow anatomy's order from head to feet: head, neck, chest, abdomen,
pelvis, legs. The chest is the slices with lung (so the liver dome and spleen lie in chest slices
too); the abdomen lies between the lung bases and the iliac crests, the neck between the skull
and the lung apices. Other slices are *undetermined*: they get the set of regions they could
belong to given the nearest landmarks above and below and generous minimum lengths of the regions
in between (neck 60 mm, chest 80 mm, abdomen 40 mm, pelvis 60 mm; the head continues 40-100 mm
below the closed skull ring), and a cross-section above 450 cm2 rules out the head. A slice with
one possible region is labelled with it. Without any landmark every region stays possible, and
landmarks in an impossible order (a long run of pelvis-like bone above the lungs, as from a
header with a wrong slice direction) make the whole scan undetermined.

Checks (:func:`check_structure`)
---------------------------------

* ``region``: none of the regions the structure lies in can be in the field of view, e.g. the
  liver (chest and abdomen) in a scan of the head. Undetermined slices count with every region
  they could be, so this fires only when the field of view is known well enough.
* ``position``: less than half of the mask lies in slices of the structure's regions, with 20 mm
  of tolerance at region borders; undetermined slices count in the mask's favour, slices without
  body against it.
* ``volume``: the mask is more than 1.5 x the largest plausible adult volume. Only the upper
  bound is checked: a field of view that cuts an organ makes its mask small for good reasons.

Structures without priors (free-text prompts) are never flagged, and neither is an empty mask.

Limits: the priors describe adults in the usual supine or prone position. Children (small
cross-sections and short regions), situs inversus (regions are head-to-feet only, so it is
harmless here), transplanted or ectopic organs, amputations, a scan without air around the body,
lungs that are not aerated at all (or severe emphysema), excretory-phase contrast and a
field of view that stops at the shoulders with neither lungs nor skull in view can mislead the
landmarks. The guard is meant to be switched off by the user in such cases. Slices are assigned
by their centre's position along the superior-inferior axis, which is approximate for strongly
tilted (gantry-tilt) grids.

This module needs numpy and scipy only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .io.volume import Volume, nearest_axes
from .vocabulary import BODY_REGIONS, Structure

__all__ = [
    "BODY_REGIONS",
    "UNKNOWN",
    "EMPTY",
    "Coverage",
    "GuardVerdict",
    "estimate_coverage",
    "check_structure",
    "describe",
]

#: Slice label of a slice whose region cannot be decided.
UNKNOWN = "unknown"
#: Slice label of a slice without body (air, table only).
EMPTY = "empty"

# ---- coarse grid ---------------------------------------------------------------------------
_SLICE_MM = 4.0  # target distance of the coarse axial slices
_SAMPLE_MM = 1.5  # target in-plane distance of the samples read from the scan
_PIXEL_MM = 3.0  # target in-plane size of a coarse pixel (a block of samples)

# ---- thresholds (HU, cm2, mL, mm) ------------------------------------------------------------
_BODY_HU = -500.0
_BONE_HU = 250.0
_CORTEX_HU = 600.0
_AIR_HU = -950.0
_PART_MIN_CM2 = 15.0
_PART_MIN_DEPTH_MM = 40.0
_PART_RELATIVE = 0.3
_LUNG_MIN_ML = 20.0
_LUNG_MEDIAN_HU = -920.0
_LUNG_MAX_AIR_FRACTION = 0.2
_LUNG_SLICE_CM2 = 2.0
_HEAD_MAX_CM2 = 450.0
_RING_MIN_CM2 = 20.0
_RING_FRACTION = 0.45
_RING_HU = (-30.0, 120.0)
_RING_MIN_EXTENT_MM = 10.0
_LATERAL = 0.12  # fraction of the body width beyond which bone is lateral
_PELVIC_PART_ML = 25.0
_PELVIS_STRONG_CM2 = 3.0
_PELVIS_CORTEX_CM2 = 0.3
_PELVIS_WEAK_CM2 = 0.8
_PELVIS_WEAK_CORTEX_CM2 = 0.05
_PELVIS_MIN_RUN_MM = 30.0
_PELVIS_BELOW_LUNGS_MM = 40.0
_PELVIS_BELOW_SKULL_MM = 250.0
_FLIPPED_RUN_MM = 80.0
_RUN_GAP_MM = 10.0
_LEG_BONE_CM2 = 1.0
_LEG_MAX_BONE_CM2 = 20.0
_CENTRAL_BONE_CM2 = 0.3

# ---- anatomy of the regions (generous adult values) -------------------------------------------
#: Shortest extent of a region crossed between two landmarks.
_MIN_LENGTH_MM = {"head": 100.0, "neck": 60.0, "chest": 80.0, "abdomen": 40.0, "pelvis": 60.0, "legs": 100.0}
#: How far a landmark region surely and at most continues beyond its landmark slices: (min, max).
_BEYOND_BELOW_MM = {
    "head": (40.0, 100.0),  # the face and skull base lie below the closed ring of the vault
    "chest": (0.0, 0.0),  # the chest is the slices with lung
    "pelvis": (0.0, 30.0),  # the ischia may end a little below the last slice found
    "legs": (0.0, math.inf),
}
_BEYOND_ABOVE_MM = {
    "head": (0.0, math.inf),
    "chest": (0.0, 0.0),
    "pelvis": (0.0, 20.0),  # a thin iliac crest may be missed
    "legs": (0.0, math.inf),
}

# ---- checks ---------------------------------------------------------------------------------
_TOLERANCE_MM = 20.0
_MIN_FRACTION = 0.5
_VOLUME_FACTOR = 1.5


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Coverage:
    """The body regions in a scan's field of view (see the module docstring).

    Attributes:
        regions: regions found in the scan, from head to feet.
        possible: regions that may be in the scan: ``regions`` plus what undetermined slices
            could be, from head to feet. A structure none of whose regions is here cannot be
            in the scan.
        extents: region -> ``(z_inferior, z_superior)``, the LPS ``z`` (mm) of the centres of
            its lowest and highest coarse slices.
        evidence: one line per landmark, e.g. ``"aerated lungs (110 mL) from z=397 to z=427 mm"``.
        slice_z: LPS ``z`` (mm) of the coarse axial slices, from head to feet (decreasing).
        slice_labels: per coarse slice, a region, :data:`UNKNOWN` or :data:`EMPTY`.
        slice_possible: per coarse slice, the regions it may belong to (empty for no body).
        slice_mm: distance between coarse slices.
    """

    regions: tuple[str, ...]
    possible: tuple[str, ...]
    extents: Mapping[str, tuple[float, float]]
    evidence: tuple[str, ...]
    slice_z: np.ndarray = field(repr=False)
    slice_labels: tuple[str, ...] = field(repr=False)
    slice_possible: tuple[frozenset[str], ...] = field(repr=False)
    slice_mm: float = 0.0

    @property
    def determined(self) -> bool:
        """True when every slice with body has one region."""
        return UNKNOWN not in self.slice_labels

    def undetermined_extents(self) -> list[tuple[float, float, tuple[str, ...]]]:
        """Runs of undetermined slices: ``(z_inferior, z_superior, regions they could be)``."""
        runs = []
        for start, stop in _runs(np.array([label == UNKNOWN for label in self.slice_labels])):
            possible = set().union(*self.slice_possible[start:stop])
            runs.append((float(self.slice_z[stop - 1]), float(self.slice_z[start]), _ordered(possible)))
        return runs


@dataclass(frozen=True)
class GuardVerdict:
    """Why a mask is implausible.

    Attributes:
        rule: ``"region"``, ``"position"`` or ``"volume"``.
        reason: one line for users, e.g. ``"scan covers head only; liver lies in the chest and abdomen"``.
        structure_id: the structure checked.
    """

    rule: str
    reason: str
    structure_id: str


# --------------------------------------------------------------------------------------------
# Coarse axial copy of the scan
# --------------------------------------------------------------------------------------------


def _slice_axis(volume: Volume) -> tuple[int, np.ndarray]:
    """The array axis closest to superior-inferior and the LPS ``z`` of each slice along it.

    ``z`` is taken at the centre of each slice.
    """
    physical_of, _ = nearest_axes(volume.direction)
    axis = physical_of.index(2)
    n = volume.shape[axis]
    index = np.tile((np.asarray(volume.shape, dtype=np.float64) - 1.0) / 2.0, (n, 1))
    index[:, axis] = np.arange(n)
    return axis, volume.index_to_physical(index)[:, 2]


@dataclass
class _Grid:
    hu: np.ndarray  # (X, Y, Z) float32 block means; X ~ left-right, Y ~ front-back, Z head to feet
    bone: np.ndarray  # (X, Y, Z) bool: a sample in the block is above _BONE_HU
    cortex: np.ndarray  # (X, Y, Z) bool: a sample in the block is above _CORTEX_HU
    pixel_mm: tuple[float, float]
    z: np.ndarray  # (Z,) LPS z of the slices, decreasing

    @property
    def pixel_cm2(self) -> float:
        return self.pixel_mm[0] * self.pixel_mm[1] / 100.0

    @property
    def voxel_ml(self) -> float:
        return self.pixel_cm2 * self.slice_mm / 10.0

    @property
    def slice_mm(self) -> float:
        return float(abs(self.z[0] - self.z[-1]) / (len(self.z) - 1)) if len(self.z) > 1 else _SLICE_MM


def _coarse_grid(volume: Volume) -> _Grid:
    physical_of, _ = nearest_axes(volume.direction)
    axis_x, axis_y, axis_z = (physical_of.index(p) for p in range(3))
    spacing = volume.spacing
    step_z = max(1, round(_SLICE_MM / spacing[axis_z]))
    step_x = max(1, round(_SAMPLE_MM / spacing[axis_x]))
    step_y = max(1, round(_SAMPLE_MM / spacing[axis_y]))
    index: list[slice] = [slice(None)] * 3
    index[axis_x], index[axis_y], index[axis_z] = slice(None, None, step_x), slice(None, None, step_y), slice(
        None, None, step_z
    )
    samples = np.transpose(np.asarray(volume.array)[tuple(index)], (axis_x, axis_y, axis_z))
    block_x = max(1, min(samples.shape[0], int(_PIXEL_MM / (step_x * spacing[axis_x]))))
    block_y = max(1, min(samples.shape[1], int(_PIXEL_MM / (step_y * spacing[axis_y]))))
    nx, ny = samples.shape[0] // block_x, samples.shape[1] // block_y
    samples = samples[: nx * block_x, : ny * block_y].astype(np.float32, copy=False)
    blocks = samples.reshape(nx, block_x, ny, block_y, samples.shape[2])
    if block_x == block_y == 1:
        hu = np.ascontiguousarray(blocks[:, 0, :, 0])
        bone, cortex = hu > _BONE_HU, hu > _CORTEX_HU
    else:
        hu = blocks.mean(axis=(1, 3), dtype=np.float32)
        peak = blocks.max(axis=(1, 3))
        bone, cortex = peak > _BONE_HU, peak > _CORTEX_HU
    _, slice_z = _slice_axis(volume)
    z = slice_z[::step_z]
    if len(z) > 1 and z[0] < z[-1]:  # make index 0 the most superior slice
        hu, bone, cortex, z = hu[:, :, ::-1], bone[:, :, ::-1], cortex[:, :, ::-1], z[::-1]
    pixel_mm = (float(step_x * block_x * spacing[axis_x]), float(step_y * block_y * spacing[axis_y]))
    return _Grid(
        np.ascontiguousarray(hu),
        np.ascontiguousarray(bone),
        np.ascontiguousarray(cortex),
        pixel_mm,
        np.asarray(z, dtype=np.float64),
    )


# --------------------------------------------------------------------------------------------
# Landmarks
# --------------------------------------------------------------------------------------------

_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[:, :, 1] = True  # 8-connected within a slice, nothing across slices
_IN_PLANE_CROSS = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_CROSS[:, :, 1] = ndimage.generate_binary_structure(2, 1)  # 4-connected within a slice


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice (pad along z so the end slices are not 'border')."""
    padded = np.pad(mask, ((0, 0), (0, 0), (1, 1)))
    return ndimage.binary_fill_holes(padded, structure=_IN_PLANE_CROSS)[:, :, 1:-1]


def _body(grid: _Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body outline per slice (holes filled), its area in cm2 and the number of separate parts."""
    dense = grid.hu > _BODY_HU
    opened = ndimage.binary_opening(dense, structure=_IN_PLANE_CROSS)
    labels, count = ndimage.label(opened, structure=_IN_PLANE)
    n_slices = grid.hu.shape[2]
    parts = np.zeros(n_slices, dtype=int)
    if count == 0:
        return np.zeros_like(dense), np.zeros(n_slices), parts
    area = np.bincount(labels.ravel(), minlength=count + 1)[1:] * grid.pixel_cm2
    keep = np.zeros(count + 1, dtype=bool)
    candidates: dict[int, list[int]] = {}
    for i, box in enumerate(ndimage.find_objects(labels)):
        if box is None:
            continue
        depth = (box[1].stop - box[1].start) * grid.pixel_mm[1]
        if area[i] >= _PART_MIN_CM2 and depth >= _PART_MIN_DEPTH_MM:
            candidates.setdefault(box[2].start, []).append(i)
    for k, members in candidates.items():
        largest = max(area[i] for i in members)
        kept = [i for i in members if area[i] >= _PART_RELATIVE * largest]
        keep[[i + 1 for i in kept]] = True
        parts[k] = len(kept)
    body = _fill_holes_per_slice(keep[labels])
    return body, body.sum(axis=(0, 1)) * grid.pixel_cm2, parts


def _lungs(grid: _Grid, body: np.ndarray) -> tuple[np.ndarray, float]:
    """Aerated lung per slice (cm2) and its total volume (mL)."""
    low = (grid.hu < _BODY_HU) & body
    labels, count = ndimage.label(low)
    area = np.zeros(grid.hu.shape[2])
    if count == 0:
        return area, 0.0
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=count + 1)
    air = np.bincount(flat, weights=(grid.hu < _AIR_HU).ravel(), minlength=count + 1)
    big = np.flatnonzero(sizes * grid.voxel_ml >= _LUNG_MIN_ML)
    big = big[big > 0]
    if big.size == 0:
        return area, 0.0
    # median above _LUNG_MEDIAN_HU <=> more than half of the voxels above it
    denser = np.bincount(flat, weights=(grid.hu > _LUNG_MEDIAN_HU).ravel(), minlength=count + 1)
    lung_ids = [
        int(i) for i in big if denser[i] > sizes[i] / 2 and air[i] <= _LUNG_MAX_AIR_FRACTION * sizes[i]
    ]
    if not lung_ids:
        return area, 0.0
    lung = np.isin(labels, lung_ids)
    return lung.sum(axis=(0, 1)) * grid.pixel_cm2, float(sizes[lung_ids].sum() * grid.voxel_ml)


def _skull_rings(grid: _Grid, body: np.ndarray, area: np.ndarray, lung_area: np.ndarray) -> np.ndarray:
    """Slices where bone closes a ring around brain-like tissue filling most of the cross-section."""
    ring = np.zeros(len(area), dtype=bool)
    cross = ndimage.generate_binary_structure(2, 1)
    for k in np.flatnonzero((area > 0) & (area <= _HEAD_MAX_CM2) & (lung_area < _LUNG_SLICE_CM2)):
        bone = grid.bone[:, :, k] & body[:, :, k]
        if bone.sum() * grid.pixel_cm2 < 1.0:
            continue
        closed = ndimage.binary_closing(bone, structure=cross)
        inside = ndimage.binary_fill_holes(closed) & ~closed
        labels, count = ndimage.label(inside)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        largest = int(np.argmax(sizes)) + 1
        interior_cm2 = sizes[largest - 1] * grid.pixel_cm2
        if interior_cm2 < _RING_MIN_CM2 or interior_cm2 < _RING_FRACTION * area[k]:
            continue
        median = float(np.median(grid.hu[:, :, k][labels == largest]))
        ring[k] = _RING_HU[0] <= median <= _RING_HU[1]
    return ring


@dataclass
class _Bones:
    left: np.ndarray  # per slice, cm2 of large lateral bone on one side (see _bones)
    right: np.ndarray  # the same on the other side
    left_cortex: np.ndarray  # cm2 of it above _CORTEX_HU
    right_cortex: np.ndarray
    central: np.ndarray  # cm2 of bone near the midline
    one_per_side: np.ndarray  # bool: each side has exactly one bone part >= _LEG_BONE_CM2, none too large


def _bones(grid: _Grid, body: np.ndarray, lung_slices: np.ndarray) -> _Bones:
    """Bone left, right and near the midline of each slice.

    Lateral bone counts for the pelvis only when its 3D part (one side, the midline band cut out)
    is large (iliac wings, femurs; not rib tips) and reaches no slice with lung (ribs, scapulae).
    Vessels, kidneys and bowel with contrast can exceed _BONE_HU, rarely _CORTEX_HU.
    """
    n_slices = grid.hu.shape[2]
    x = (np.arange(grid.hu.shape[0]) + 0.5) * grid.pixel_mm[0]
    columns = body.any(axis=1)  # (X, Z)
    counts = body.sum(axis=1).astype(np.float64)  # (X, Z)
    total = counts.sum(axis=0)
    centre = np.where(total > 0, (x @ counts) / np.maximum(total, 1), 0.0)
    first = np.where(columns.any(axis=0), columns.argmax(axis=0), 0)
    last = np.where(columns.any(axis=0), columns.shape[0] - 1 - columns[::-1].argmax(axis=0), 0)
    width = (last - first + 1) * grid.pixel_mm[0]
    dx = x[:, None] - centre[None, :]  # (X, Z)
    side = np.where(dx >= _LATERAL * width[None, :], 1, np.where(dx <= -_LATERAL * width[None, :], -1, 0))
    side3 = np.broadcast_to(side[:, None, :], grid.hu.shape)
    bone = grid.bone & body
    central = (bone & (side3 == 0)).sum(axis=(0, 1)) * grid.pixel_cm2
    lateral = bone & (side3 != 0)

    # large lateral parts in 3D, away from the lungs
    labels, count = ndimage.label(lateral, structure=np.ones((3, 3, 3), dtype=bool))
    large = np.zeros(count + 1, dtype=bool)
    if count:
        sizes = np.bincount(labels.ravel(), minlength=count + 1) * grid.voxel_ml
        near_lung = np.zeros(count + 1, dtype=bool)
        if lung_slices.any():
            near_lung[np.unique(labels[:, :, lung_slices])] = True
        large = (sizes >= _PELVIC_PART_ML) & ~near_lung
        large[0] = False
    pelvic = large[labels]
    left = (pelvic & (side3 == 1)).sum(axis=(0, 1)) * grid.pixel_cm2
    right = (pelvic & (side3 == -1)).sum(axis=(0, 1)) * grid.pixel_cm2
    left_cortex = (pelvic & grid.cortex & (side3 == 1)).sum(axis=(0, 1)) * grid.pixel_cm2
    right_cortex = (pelvic & grid.cortex & (side3 == -1)).sum(axis=(0, 1)) * grid.pixel_cm2

    # bone parts per side within each slice (legs: one femur, tibia or pair of shank bones per side)
    labels, count = ndimage.label(lateral, structure=_IN_PLANE)
    one_per_side = np.zeros(n_slices, dtype=bool)
    if count:
        sizes = np.bincount(labels.ravel(), minlength=count + 1) * grid.pixel_cm2
        tally = np.zeros((n_slices, 2), dtype=int)
        too_big = np.zeros(n_slices, dtype=bool)
        for i, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None or sizes[i] < _LEG_BONE_CM2:
                continue
            k = box[2].start
            s = 0 if side[(box[0].start + box[0].stop) // 2, k] > 0 else 1
            tally[k, s] += 1
            too_big[k] |= sizes[i] > _LEG_MAX_BONE_CM2
        one_per_side = (tally[:, 0] == 1) & (tally[:, 1] == 1) & ~too_big
    return _Bones(left, right, left_cortex, right_cortex, central, one_per_side)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` index ranges of consecutive True values."""
    flags = np.asarray(flags, dtype=bool)
    if flags.size == 0:
        return []
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _close_gaps(flags: np.ndarray, gap: int) -> np.ndarray:
    """Set runs of up to ``gap`` False values between True values."""
    flags = np.asarray(flags, dtype=bool).copy()
    if gap <= 0:
        return flags
    true = np.flatnonzero(flags)
    for a, b in zip(true[:-1], true[1:]):
        if 1 < b - a <= gap + 1:
            flags[a:b] = True
    return flags


# --------------------------------------------------------------------------------------------
# Regions
# --------------------------------------------------------------------------------------------


def _ordered(regions: Iterable[str]) -> tuple[str, ...]:
    regions = set(regions)
    return tuple(r for r in BODY_REGIONS if r in regions)


def _below(region: str, distance: float) -> set[str]:
    """Regions possible ``distance`` mm below the lowest landmark slice of ``region``."""
    least, most = _BEYOND_BELOW_MM[region]
    out = {region} if distance <= most else set()
    travelled = least
    for following in BODY_REGIONS[BODY_REGIONS.index(region) + 1 :]:
        if distance <= travelled:
            break
        out.add(following)
        travelled += _MIN_LENGTH_MM[following]
    return out


def _above(region: str, distance: float) -> set[str]:
    """Regions possible ``distance`` mm above the highest landmark slice of ``region``."""
    least, most = _BEYOND_ABOVE_MM[region]
    out = {region} if distance <= most else set()
    travelled = least
    for preceding in reversed(BODY_REGIONS[: BODY_REGIONS.index(region)]):
        if distance <= travelled:
            break
        out.add(preceding)
        travelled += _MIN_LENGTH_MM[preceding]
    return out


def _fmt_z(z: float) -> str:
    return f"{z:.0f}"


def _span(z: np.ndarray, start: int, stop: int) -> str:
    return f"from z={_fmt_z(z[stop - 1])} to z={_fmt_z(z[start])} mm"


def _undetermined(grid_z: np.ndarray, has_body: np.ndarray, evidence: list[str], slice_mm: float) -> Coverage:
    labels = tuple(UNKNOWN if b else EMPTY for b in has_body)
    every = frozenset(BODY_REGIONS)
    possible = tuple(every if b else frozenset() for b in has_body)
    regions = BODY_REGIONS if has_body.any() else ()
    return Coverage((), regions, {}, tuple(evidence), grid_z, labels, possible, slice_mm)


def _pelvis(
    bones: _Bones,
    z: np.ndarray,
    no_lung: np.ndarray,
    legs_top: int | None,
    last_body: int,
    lung_top: int | None,
    lung_bottom: int | None,
    ring_bottom: int | None,
) -> tuple[tuple[int, int] | None, bool]:
    """The pelvis's slices ``[start, stop)`` or None; and whether pelvis-like bone lies above the lungs."""
    n = len(z)
    dz = float(abs(z[0] - z[-1]) / (n - 1)) if n > 1 else _SLICE_MM
    lateral = np.minimum(bones.left, bones.right)
    cortex = np.minimum(bones.left_cortex, bones.right_cortex)
    strong = no_lung & (lateral >= _PELVIS_STRONG_CM2) & (cortex >= _PELVIS_CORTEX_CM2)
    weak = no_lung & (lateral >= _PELVIS_WEAK_CM2) & (cortex >= _PELVIS_WEAK_CORTEX_CM2)
    limit = legs_top if legs_top is not None else n
    strong[limit:] = False
    weak[limit:] = False
    flipped = False
    for start, stop in reversed(_runs(_close_gaps(weak, int(round(_RUN_GAP_MM / dz))))):
        if not strong[start:stop].any():
            continue
        length = abs(z[start] - z[stop - 1]) + dz
        if lung_top is not None and stop <= lung_top:
            flipped |= length >= _FLIPPED_RUN_MM
            continue
        if length < _PELVIS_MIN_RUN_MM and stop < min(limit, last_body + 1):
            continue  # short, and ending neither at the legs nor at the bottom of the scan
        if lung_bottom is not None and z[lung_bottom] - z[start] < _PELVIS_BELOW_LUNGS_MM:
            continue
        if ring_bottom is not None and z[ring_bottom] - z[start] < _PELVIS_BELOW_SKULL_MM:
            continue
        return (start, stop), flipped
    return None, flipped


def estimate_coverage(volume: Volume) -> Coverage:
    """Estimate which body regions a CT shows (see the module docstring for how).

    Args:
        volume: a CT in Hounsfield units, any voxel order and orientation.

    Returns:
        A :class:`Coverage`; regions that cannot be decided stay undetermined (they never make
        the guard fire).
    """
    grid = _coarse_grid(volume)
    dz = grid.slice_mm
    z = grid.z
    n = len(z)
    evidence: list[str] = []
    if np.count_nonzero(grid.hu < _BODY_HU) < 0.005 * grid.hu.size:
        evidence.append(f"no air below {_BODY_HU:.0f} HU: not a CT in HU, or cropped inside the body")
        return _undetermined(z, np.ones(n, dtype=bool), evidence, dz)
    body, area, parts = _body(grid)
    has_body = area > 0
    if not has_body.any():
        evidence.append("no body outline found")
        return _undetermined(z, np.ones(n, dtype=bool), evidence, dz)
    evidence.append(
        f"body outline in {int(has_body.sum())} of {n} slices, cross-section "
        f"{area[has_body].min():.0f}-{area[has_body].max():.0f} cm2"
    )
    lung_area, lung_ml = _lungs(grid, body)
    lung_slices = lung_area >= _LUNG_SLICE_CM2
    ring = _skull_rings(grid, body, area, lung_area)
    bones = _bones(grid, body, lung_slices)
    no_lung = ~lung_slices & has_body
    gap = int(round(_RUN_GAP_MM / dz))
    landmark = np.full(n, "", dtype=object)

    # chest: the slices between the highest and lowest with lung
    lung_top = lung_bottom = None
    if lung_slices.any():
        lung_top, lung_bottom = int(np.flatnonzero(lung_slices)[0]), int(np.flatnonzero(lung_slices)[-1])
        landmark[lung_top : lung_bottom + 1] = "chest"
        evidence.append(f"aerated lungs ({lung_ml:.0f} mL) {_span(z, lung_top, lung_bottom + 1)}")
    else:
        evidence.append("no aerated lungs")

    # head: skull ring slices, above the lungs
    if lung_top is not None:
        ring[lung_top:] = False
    ring_idx = np.flatnonzero(ring)
    ring_bottom = None
    if ring_idx.size >= 2 and abs(z[ring_idx[0]] - z[ring_idx[-1]]) >= _RING_MIN_EXTENT_MM:
        ring_bottom = int(ring_idx[-1])
        landmark[ring_idx[0] : ring_bottom + 1] = "head"
        evidence.append(f"skull (bone ring around brain) {_span(z, int(ring_idx[0]), ring_bottom + 1)}")

    # legs: at the bottom, two separate parts, or one bone per side and none near the midline
    legs_like = no_lung & ((parts >= 2) | (bones.one_per_side & (bones.central < _CENTRAL_BONE_CM2)))
    legs_top = None
    body_idx = np.flatnonzero(has_body)
    last_body = int(body_idx[-1])
    beyond = np.arange(n) > last_body  # slices without body below the last one with body
    legs_like = (_close_gaps(legs_like, gap) & ~beyond) | beyond
    runs = _runs(legs_like)
    if runs and runs[-1][1] == n and runs[-1][0] <= last_body:
        start = runs[-1][0]
        if lung_bottom is None or start > lung_bottom:
            legs_top = start
    # pelvis: hysteresis on lateral bone on both sides, above the legs if there are any
    pelvis_run, flipped = _pelvis(bones, z, no_lung, legs_top, last_body, lung_top, lung_bottom, ring_bottom)
    if legs_top is not None and pelvis_run is None and (lung_bottom is not None or ring_bottom is not None):
        legs_top = None  # legs below a chest or head need the pelvis in between
        pelvis_run, flipped = _pelvis(bones, z, no_lung, None, last_body, lung_top, lung_bottom, ring_bottom)
    if flipped and pelvis_run is None:
        evidence.append("pelvis-like bone above the lungs: landmarks out of order (slice direction wrong?)")
        return _undetermined(z, has_body, evidence, dz)
    if pelvis_run is not None:
        landmark[pelvis_run[0] : pelvis_run[1]] = "pelvis"
        evidence.append(f"bony pelvis (bone on both sides) {_span(z, *pelvis_run)}")
    else:
        evidence.append("no bony pelvis")
    if legs_top is not None:
        landmark[legs_top:] = np.where(has_body[legs_top:], "legs", "")
        evidence.append(f"legs (two parts or one bone per side) {_span(z, legs_top, last_body + 1)}")

    labels, possible = _assign(landmark, z, has_body, area)
    if any(label == UNKNOWN for label in labels):
        for start, stop in _runs(np.array([label == UNKNOWN for label in labels])):
            could = _ordered(set().union(*possible[start:stop]))
            evidence.append(f"undetermined {_span(z, start, stop)}: {' or '.join(could)}")
    present = _ordered(label for label in labels if label in BODY_REGIONS)
    extents = {}
    for region in present:
        idx = [i for i, label in enumerate(labels) if label == region]
        extents[region] = (float(z[idx[-1]]), float(z[idx[0]]))
    all_possible = _ordered(set().union(*possible))
    return Coverage(present, all_possible, extents, tuple(evidence), z, labels, possible, dz)


def _assign(
    landmark: np.ndarray, z: np.ndarray, has_body: np.ndarray, area: np.ndarray
) -> tuple[tuple[str, ...], tuple[frozenset[str], ...]]:
    """Label every slice from the landmark slices, anatomy's order and the regions' lengths."""
    n = len(z)
    known = [i for i in range(n) if landmark[i]]
    labels: list[str] = []
    possible: list[frozenset[str]] = []
    for i in range(n):
        if not has_body[i]:
            labels.append(EMPTY)
            possible.append(frozenset())
            continue
        if landmark[i]:
            labels.append(landmark[i])
            possible.append(frozenset([landmark[i]]))
            continue
        regions = set(BODY_REGIONS)
        above = [j for j in known if j < i]
        below = [j for j in known if j > i]
        if above:
            regions &= _below(landmark[above[-1]], abs(z[above[-1]] - z[i]))
        if below:
            regions &= _above(landmark[below[0]], abs(z[i] - z[below[0]]))
        if area[i] > _HEAD_MAX_CM2:
            regions.discard("head")
        if not regions:  # inconsistent landmarks: anything goes
            regions = set(BODY_REGIONS)
        labels.append(next(iter(regions)) if len(regions) == 1 else UNKNOWN)
        possible.append(frozenset(regions))
    return tuple(labels), tuple(possible)


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _join(words: Iterable[str]) -> str:
    words = list(words)
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _display(structure: Structure) -> str:
    name = structure.name
    return name[0].lower() + name[1:] if len(name) > 1 and name[1].islower() else name


def _volume_text(ml: float) -> str:
    return f"{ml / 1000:.1f} L" if ml >= 1000 else f"{ml:.0f} mL"


def _mask_fraction_in(
    mask: np.ndarray,
    volume: Volume,
    coverage: Coverage,
    regions: set[str],
    tolerance_mm: float = _TOLERANCE_MM,
) -> tuple[float, str]:
    """Fraction of the mask in slices of ``regions`` (with tolerance) and where the rest mostly lies."""
    axis, z = _slice_axis(volume)
    other = tuple(a for a in range(3) if a != axis)
    counts = np.count_nonzero(mask, axis=other).astype(np.float64)
    cz = np.asarray(coverage.slice_z, dtype=np.float64)
    if cz.size == 0:
        return 1.0, ""
    nearest = np.abs(z[:, None] - cz[None, :]).argmin(axis=1)
    far = np.abs(z - cz[nearest]) > max(coverage.slice_mm, 1e-6)
    ok = np.array([bool(p & regions) for p in coverage.slice_possible])
    reach = int(math.ceil(tolerance_mm / max(coverage.slice_mm, 1e-6)))
    if reach > 0 and ok.size:
        ok = ndimage.binary_dilation(ok, iterations=reach) if ok.any() else ok
    inside = ok[nearest] | far
    total = counts.sum()
    fraction = float(counts[inside].sum() / total) if total else 1.0
    outside = counts * ~inside
    where = ""
    if outside.sum():
        tally: dict[str, float] = {}
        for count, k in zip(outside, nearest):
            if count:
                tally[coverage.slice_labels[k]] = tally.get(coverage.slice_labels[k], 0.0) + count
        label = max(tally, key=tally.get)
        zs = z[outside > 0]
        what = {EMPTY: "slices without body", UNKNOWN: "undetermined slices"}.get(label, f"the {label}")
        where = f"{what} (z={_fmt_z(zs.min())} to {_fmt_z(zs.max())} mm)"
    return fraction, where


def check_structure(
    structure: Structure | None,
    mask: np.ndarray,
    volume: Volume,
    coverage: Coverage,
) -> GuardVerdict | None:
    """Whether ``mask`` is an implausible segmentation of ``structure`` in this scan.

    Args:
        structure: the structure the mask claims to be, or None (free text): never flagged.
        mask: boolean array on ``volume``'s grid.
        volume: the scan (for its geometry).
        coverage: :func:`estimate_coverage` of ``volume``.

    Returns:
        A :class:`GuardVerdict` for the first rule that fires (``region``, then ``position``,
        then ``volume``), or None when the mask is plausible, empty, or cannot be judged.
    """
    if structure is None or not getattr(structure, "id", None):
        return None
    mask = np.asarray(mask)
    if mask.shape != volume.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the volume {volume.shape}")
    voxels = int(np.count_nonzero(mask))
    if voxels == 0:
        return None
    name = _display(structure)
    regions = set(structure.regions)
    if regions and coverage.possible:
        if not regions & set(coverage.possible):
            # "at most": undetermined slices could be regions not found for certain
            certain = coverage.possible == coverage.regions
            fov = _join(coverage.possible) + (" only" if certain else " at most")
            return GuardVerdict(
                "region", f"scan covers {fov}; {name} lies in the {_join(_ordered(regions))}", structure.id
            )
        fraction, where = _mask_fraction_in(mask.astype(bool, copy=False), volume, coverage, regions)
        if fraction < _MIN_FRACTION:
            return GuardVerdict(
                "position",
                f"only {100 * fraction:.0f}% of the {name} mask lies in the {_join(_ordered(regions))}; "
                f"most of the rest is in {where}",
                structure.id,
            )
    if structure.volume_ml is not None:
        ml = voxels * volume.voxel_volume_ml
        limit = _VOLUME_FACTOR * structure.volume_ml[1]
        if ml > limit:
            return GuardVerdict(
                "volume",
                f"mask is {_volume_text(ml)}, more than {_VOLUME_FACTOR:g} x the largest plausible adult "
                f"{name} ({_volume_text(structure.volume_ml[1])})",
                structure.id,
            )
    return None


def describe(coverage: Coverage) -> str:
    """One line for summaries, e.g. ``"field of view: chest, abdomen, pelvis"``."""
    if not coverage.regions:
        if coverage.possible and len(coverage.possible) < len(BODY_REGIONS):
            return f"field of view: undetermined ({' or '.join(coverage.possible)})"
        return "field of view: undetermined"
    text = "field of view: " + ", ".join(coverage.regions)
    extra = [r for r in coverage.possible if r not in coverage.regions]
    if extra:
        text += f" (part undetermined, possibly {' or '.join(extra)})"
    return text
