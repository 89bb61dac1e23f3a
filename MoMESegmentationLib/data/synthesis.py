"""CT images synthesised from label maps, with appearance randomised within CT physics.

The answer to "few labelled scans" that SynthSeg made known (Billot et al., Medical Image Analysis
2023): train on images drawn from label maps with randomised appearance, so that a network learns
shapes and layout instead of one scanner's look. For CT the intensities are anchored in Hounsfield
units, so the randomisation stays within physics instead of drawing free Gaussian mixtures:

1. **Shape**: the label map is deformed by a random affine map (rotation up to 10 degrees, scaling
   0.85 to 1.15 per axis, never a mirror, so left stays left) and a smooth random displacement
   (up to 8 mm); nearest-neighbour, on the label map's own grid.
2. **Tissue**: every structure id gets a tissue (liver, kidney, artery, bone, bowel, ...). Per scan
   a contrast phase is drawn (native, arterial, portal venous, delayed), an enhancement factor
   (0.6 to 1.3, contrast dose and timing), a kVp factor for iodine and bone (0.85 to 1.25), and each
   tissue's HU is the phantoms' table value for that phase plus a jitter of up to 12 HU. Unlabelled
   voxels near the labelled anatomy become the body: visceral fat and connective tissue inside, an
   abdominal wall (skin, subcutaneous fat of random thickness, muscle) at its surface, air outside.
   Bones get a cortical rim; bowel gets fluid and gas pockets.
3. **Acquisition**: tissue texture at two scales, a point-spread blur in plane and a slice-profile
   blur across slices (slice thickness), correlated noise of random level, and sometimes streaks
   from dense structures.

Fields of view, thin slabs and body size are left to the training transforms (random crops,
slabs, scaling), which apply to synthetic and real cases alike.

Example::

    from MoMESegmentationLib.data.sample import load_sample_ct
    case = load_sample_ct()
    scan = synthesize_ct(case.labels, case.label_table, seed=3)
    scan.image.array            # float32 HU on the label map's grid
    scan.labels.array           # the deformed label map (same values, same table)
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..io.volume import Volume
from .phantoms import _CORTICAL_HU, _HU_TABLE, CONTRAST_PHASES, _smooth_noise, _T

__all__ = ["SynthScan", "TISSUE_RULES", "deform_labels", "synthesize_ct", "tissue_of"]

logger = logging.getLogger(__name__)

#: Structure id pattern -> tissue of the phantoms' HU table, first match wins; everything else is
#: soft tissue (muscle-like). Bowel, stomach and bone get their inner structure in `_paint`.
TISSUE_RULES: tuple[tuple[str, _T], ...] = (
    (r"^liver", _T.LIVER),
    (r"^spleen", _T.SPLEEN),
    (r"^kidney", _T.KIDNEY_CORTEX),
    (r"^pancreas", _T.PANCREAS),
    (r"^stomach", _T.STOMACH_WALL),
    (r"^gallbladder", _T.BILE),
    (r"^urinary_bladder", _T.URINE),
    (r"portal_vein|splenic_vein", _T.PORTAL),
    (r"vena|vein", _T.VEIN),
    (r"aorta|artery|arteries|trunk|carotid", _T.ARTERY),
    (r"^heart|atrial_appendage", _T.BLOOD),
    (r"^lung", _T.LUNG),
    (r"^trachea", _T.GAS),
    (r"^(esophagus|duodenum|small_bowel|colon)", _T.BOWEL_WALL),
    (r"costal_cartilages", _T.CARTILAGE),
    (r"intervertebral_discs?", _T.DISC),
    (r"^spinal_cord|^brain", _T.CSF),
    (r"^(vertebra|sacrum|rib|hip|femur|humerus|scapula|clavicula|sternum|skull)", _T.BONE),
    (r"gluteus|iliopsoas|autochthon|muscle", _T.MUSCLE),
)

#: Tissues whose HU carries iodine or calcium and so scales with the kVp factor.
_KVP_SCALED = {_T.ARTERY, _T.VEIN, _T.PORTAL, _T.BLOOD, _T.KIDNEY_CORTEX, _T.KIDNEY_MEDULLA, _T.BONE}


def tissue_of(structure_id: str) -> _T:
    """The tissue a structure is painted with (see :data:`TISSUE_RULES`)."""
    for pattern, tissue in TISSUE_RULES:
        if re.search(pattern, structure_id):
            return tissue
    return _T.MUSCLE


@dataclass
class SynthScan:
    """A synthetic CT and the (deformed) label map it was drawn from, on one grid."""

    image: Volume  # float32 HU
    labels: Volume  # the deformed label map, values as in the input table
    phase: str
    seed: int


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    angles = np.radians(rng.uniform(-max_deg, max_deg, 3))
    out = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        a, b = [x for x in range(3) if x != axis]
        r = np.eye(3)
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        out = out @ r
    return out


def deform_labels(labels: np.ndarray, spacing, rng: np.random.Generator, max_rotation_deg: float = 10.0,
                  scale_range: tuple[float, float] = (0.85, 1.15), max_displacement_mm: float = 8.0,
                  smoothness_mm: float = 40.0) -> np.ndarray:
    """The label map under a random affine map (no mirror) and a smooth random displacement.

    Output voxel ``x`` (mm, about the grid's centre) takes the label at ``A x + d(x)``; ``A`` is a
    rotation times a diagonal scaling (positive, so the map keeps left and right), ``d`` a smooth
    field of at most ``max_displacement_mm``. Nearest neighbour; outside the input is background.
    """
    labels = np.asarray(labels)
    spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
    shape = labels.shape
    matrix = _rotation(rng, max_rotation_deg) @ np.diag(rng.uniform(*scale_range, 3))
    centre = (np.array(shape) - 1) / 2.0
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    mm = (grid - centre[:, None].astype(np.float32)) * spacing[:, None].astype(np.float32)
    source = matrix.astype(np.float32) @ mm
    if max_displacement_mm > 0:
        magnitude = rng.uniform(0.0, max_displacement_mm)
        sigma = smoothness_mm / spacing
        for axis in range(3):
            field = _smooth_noise(shape, sigma, rng).reshape(-1)
            source[axis] += field * np.float32(magnitude / 2.0)  # unit-SD field: |d| <~ magnitude
    coords = source / spacing[:, None].astype(np.float32) + centre[:, None].astype(np.float32)
    out = ndimage.map_coordinates(labels, coords, order=0, mode="constant", cval=0)
    return out.reshape(shape).astype(labels.dtype)


def _axis_of(direction: np.ndarray, lps_axis: int) -> int:
    """The voxel axis closest to an LPS axis (2: superior, the slice axis of an axial scan)."""
    return int(np.argmax(np.abs(np.asarray(direction)[lps_axis])))


def synthesize_ct(labels: Volume, label_table: dict[int, str], seed: int = 0, deform: bool = True,
                  noise: bool = True) -> SynthScan:
    """A CT drawn from a label map with randomised, physically plausible appearance.

    Args:
        labels: integer label map with its grid (spacing, origin, direction in LPS).
        label_table: label value -> structure id (``class_map.json`` names); values missing from
            the table are painted as soft tissue.
        seed: everything random derives from it.
        deform: apply the random shape change (:func:`deform_labels`) first.
        noise: add acquisition noise and streaks (off for tests of the painting alone).
    """
    rng = np.random.default_rng(seed)
    spacing = np.asarray(labels.spacing, dtype=np.float64)
    array = np.asarray(labels.array).astype(np.int32)
    if deform:
        array = deform_labels(array, spacing, rng)
    phase_index = int(rng.choice(len(CONTRAST_PHASES), p=(0.15, 0.25, 0.45, 0.15)))
    tissue = _paint(array, label_table, spacing, rng)
    image = _intensities(tissue, spacing, labels.direction, phase_index, rng, noise)
    image_volume = Volume(image, spacing.copy(), np.asarray(labels.origin).copy(), np.asarray(labels.direction).copy(),
                          name=f"synth{seed}")
    label_volume = Volume(array, spacing.copy(), np.asarray(labels.origin).copy(), np.asarray(labels.direction).copy(),
                          name=f"synth{seed}_labels")
    return SynthScan(image_volume, label_volume, CONTRAST_PHASES[phase_index], int(seed))


def _paint(array: np.ndarray, label_table: dict[int, str], spacing: np.ndarray,
           rng: np.random.Generator) -> np.ndarray:
    """The tissue map: labelled structures by :func:`tissue_of`, the body around them, air outside."""
    lut = np.full(int(array.max()) + 1, int(_T.MUSCLE), dtype=np.uint8)
    lut[0] = int(_T.AIR)
    for value, name in label_table.items():
        if 0 < int(value) < lut.size:
            lut[int(value)] = int(tissue_of(str(name)))
    tissue = lut[array]
    labelled = array > 0

    # The body: within a random margin of the labelled anatomy, holes filled slice by slice.
    if labelled.any():
        margin_mm = rng.uniform(12.0, 45.0)
        distance = ndimage.distance_transform_edt(~labelled, sampling=spacing)
        body = distance <= margin_mm
        slice_axis = int(np.argmax(spacing)) if spacing.max() > 1.2 * spacing.min() else 2
        for index in range(body.shape[slice_axis]):
            cut = [slice(None)] * 3
            cut[slice_axis] = index
            body[tuple(cut)] = ndimage.binary_fill_holes(body[tuple(cut)])
        depth = ndimage.distance_transform_edt(body, sampling=spacing)  # mm from the outside
        skin = rng.uniform(1.5, 3.0)
        subcutaneous = skin + rng.uniform(3.0, 30.0)
        wall = subcutaneous + rng.uniform(4.0, 14.0)
        free = body & ~labelled
        visceral = _smooth_noise(array.shape, 6.0 / spacing, rng) > rng.uniform(-0.6, 0.6)
        body_tissue = np.where(visceral, np.uint8(_T.VISCERAL_FAT), np.uint8(_T.BOWEL_FLUID))
        body_tissue = np.where(depth <= wall, np.uint8(_T.MUSCLE), body_tissue)
        body_tissue = np.where(depth <= subcutaneous, np.uint8(_T.FAT), body_tissue)
        body_tissue = np.where(depth <= skin, np.uint8(_T.SKIN), body_tissue)
        tissue = np.where(free, body_tissue, tissue)

    # Inner structure: bowel content and gas, gastric content, kidney medulla, bone cortex.
    coarse = _smooth_noise(array.shape, 3.0 / spacing, rng)
    bowel = tissue == _T.BOWEL_WALL
    if bowel.any():
        inner = bowel & (ndimage.distance_transform_edt(bowel, sampling=spacing) > rng.uniform(2.0, 4.0))
        tissue[inner] = int(_T.BOWEL_FLUID)
        tissue[inner & (coarse > rng.uniform(1.0, 2.5))] = int(_T.GAS)
    stomach = tissue == _T.STOMACH_WALL
    if stomach.any():
        inner = stomach & (ndimage.distance_transform_edt(stomach, sampling=spacing) > rng.uniform(3.0, 6.0))
        tissue[inner] = int(_T.GASTRIC_CONTENT)
        tissue[inner & (coarse > rng.uniform(0.8, 2.0))] = int(_T.GAS)
    kidney = tissue == _T.KIDNEY_CORTEX
    if kidney.any():
        tissue[kidney & (ndimage.distance_transform_edt(kidney, sampling=spacing) > rng.uniform(4.0, 8.0))] = \
            int(_T.KIDNEY_MEDULLA)
    return tissue


def _intensities(tissue: np.ndarray, spacing: np.ndarray, direction: np.ndarray, phase_index: int,
                 rng: np.random.Generator, noise: bool) -> np.ndarray:
    """HU from the tissue map: randomised table values, texture, blur, noise, streaks."""
    n = len(_T)
    base = np.zeros(n, dtype=np.float32)
    fine = np.zeros(n, dtype=np.float32)
    medium = np.zeros(n, dtype=np.float32)
    enhancement = rng.uniform(0.6, 1.3)
    kvp = rng.uniform(0.85, 1.25)
    texture = rng.uniform(0.5, 2.0)
    for member, (values, sd_fine, sd_medium) in _HU_TABLE.items():
        native = values[0]
        value = native + (values[phase_index] - native) * enhancement
        if member in _KVP_SCALED:
            value *= kvp
        if member not in (_T.AIR, _T.GAS):
            value += rng.uniform(-12.0, 12.0)
        base[int(member)] = value
        fine[int(member)] = sd_fine * texture
        medium[int(member)] = sd_medium * texture
    image = base[tissue] + fine[tissue] * _smooth_noise(tissue.shape, 1.0 / spacing, rng) \
        + medium[tissue] * _smooth_noise(tissue.shape, 4.0 / spacing, rng)

    # Cortical bone: a rim of dense bone around every bone.
    bone = tissue == _T.BONE
    if bone.any():
        rim = bone & (ndimage.distance_transform_edt(bone, sampling=spacing) <= rng.uniform(1.0, 2.5))
        image[rim] = _CORTICAL_HU * kvp * rng.uniform(0.7, 1.2)

    # Point spread in plane, slice profile across slices.
    slice_axis = _axis_of(direction, 2)
    sigma_mm = np.full(3, rng.uniform(0.4, 1.0))
    sigma_mm[slice_axis] = rng.uniform(0.5, 2.5)
    image = ndimage.gaussian_filter(image, np.maximum(sigma_mm / spacing, 0.2), truncate=2.5)

    if noise:
        grain = rng.standard_normal(tissue.shape, dtype=np.float32)
        grain = ndimage.gaussian_filter(grain, np.maximum(rng.uniform(0.4, 0.9) / spacing, 0.3), truncate=2.5)
        grain *= np.float32(rng.uniform(4.0, 35.0) / (float(grain.std()) or 1.0))
        image += grain
        if bone.any() and rng.random() < 0.15:
            image += _streaks(bone, slice_axis, rng)
    np.clip(image, -1024, 3071, out=image)
    return np.round(image).astype(np.float32)


def _streaks(dense: np.ndarray, slice_axis: int, rng: np.random.Generator) -> np.ndarray:
    """Beam-hardening-like streaks: lines of alternating sign through a dense structure, per slice."""
    axes = [a for a in range(3) if a != slice_axis]
    centre = np.array(np.nonzero(dense)).mean(axis=1)
    u, v = np.meshgrid(np.arange(dense.shape[axes[0]]) - centre[axes[0]],
                       np.arange(dense.shape[axes[1]]) - centre[axes[1]], indexing="ij")
    plane = np.zeros(u.shape, dtype=np.float32)
    for _ in range(int(rng.integers(2, 6))):
        angle = rng.uniform(0, np.pi)
        distance = np.abs(u * np.sin(angle) - v * np.cos(angle))
        plane += np.float32(rng.choice([-1, 1]) * rng.uniform(40, 150)) * np.exp(-distance / 1.5).astype(np.float32)
    return np.expand_dims(plane, slice_axis).astype(np.float32)
