"""Procedural abdominal CT phantoms with exact labels, for tests and training.

A phantom is drawn in two independent steps, each from its own stream of the seed:

1. **Anatomy** in patient space (LPS millimetres: ``+x`` patient left, ``+y`` posterior, ``+z``
   superior): body wall (skin, subcutaneous fat, muscle), abdominal organs, vessels, spine, ribs,
   pelvis, lung bases and heart, with random sizes, positions, fat, contrast phase and a smooth random
   displacement field. Shapes are implicit functions (superellipsoids and tubes along polylines)
   evaluated at the physical centre of every voxel, so the anatomy does not depend on the grid.
2. **Grid**: random field of view along ``z`` (sometimes without lungs or bladder), random
   anisotropic spacing, a random signed axis permutation of the voxel grid and optionally a small
   oblique rotation. The voxel order changes; the anatomy and the geometry metadata stay exact.

Intensities are Hounsfield units from a per-tissue table that depends on the contrast phase
(``native``, ``arterial``, ``portal_venous``, ``delayed``), plus smooth tissue texture, a small
point-spread blur and acquisition noise. Label values are TotalSegmentator's ``total`` class values,
so phantom labels and the bundled sample CT share one table.

Example::

    phantom = make_phantom(0, shape=(64, 64, 64))
    phantom.image.array.shape      # (64, 64, 64), float32 HU, array[i, j, k]
    phantom.label_table[5]         # 'liver'
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from scipy import ndimage

from ..io.volume import Volume

__all__ = [
    "Phantom",
    "PHANTOM_LABELS",
    "CONTRAST_PHASES",
    "make_phantom",
    "phantom_label_names",
    "phantom_label_table",
]

logger = logging.getLogger(__name__)

#: Structure id -> label value (TotalSegmentator 'total' class values).
PHANTOM_LABELS: dict[str, int] = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "gallbladder": 4,
    "liver": 5,
    "stomach": 6,
    "pancreas": 7,
    "lung_lower_lobe_left": 11,
    "lung_lower_lobe_right": 14,
    "urinary_bladder": 21,
    "vertebrae_L5": 27,
    "vertebrae_L4": 28,
    "vertebrae_L3": 29,
    "vertebrae_L2": 30,
    "vertebrae_L1": 31,
    "vertebrae_T12": 32,
    "aorta": 52,
    "inferior_vena_cava": 63,
}

CONTRAST_PHASES = ("native", "arterial", "portal_venous", "delayed")
_PHASE_PROBABILITIES = (0.15, 0.25, 0.45, 0.15)


def phantom_label_names() -> list[str]:
    """Structure ids that phantoms label, in label-value order."""
    return [name for name, _ in sorted(PHANTOM_LABELS.items(), key=lambda item: item[1])]


def phantom_label_table() -> dict[int, str]:
    """Label value -> structure id for every structure a phantom can contain."""
    return {value: name for name, value in sorted(PHANTOM_LABELS.items(), key=lambda item: item[1])}


@dataclass
class Phantom:
    """A synthetic CT with its label map.

    Attributes:
        image: float32 Hounsfield units, shape ``(I, J, K)``, LPS geometry.
        labels: uint8 label map on the same grid; values from :data:`PHANTOM_LABELS`.
        label_table: every structure the generator labels (value -> id). A structure outside the
            field of view is absent from ``labels`` but still listed: its mask is truly empty.
        centers: nominal LPS position (mm) of each structure before the random deformation.
        phase: contrast phase used for the intensities.
        seed: the seed the phantom was drawn from.
    """

    image: Volume
    labels: Volume
    label_table: dict[int, str]
    centers: dict[str, np.ndarray] = field(default_factory=dict)
    phase: str = "portal_venous"
    seed: int = 0

    def present_labels(self) -> dict[int, str]:
        """The entries of ``label_table`` that occur in ``labels``."""
        values = set(np.unique(self.labels.array).tolist())
        return {value: name for value, name in self.label_table.items() if value in values}


# ----------------------------------------------------------------------------- tissues and HU
class _T(IntEnum):
    AIR = 0
    FAT = 1
    SKIN = 2
    MUSCLE = 3
    VISCERAL_FAT = 4
    BOWEL_WALL = 5
    BOWEL_FLUID = 6
    GAS = 7
    FECES = 8
    ORAL_CONTRAST = 9
    LIVER = 10
    LIVER_VESSEL = 11
    SPLEEN = 12
    KIDNEY_CORTEX = 13
    KIDNEY_MEDULLA = 14
    COLLECTING = 15
    PANCREAS = 16
    STOMACH_WALL = 17
    GASTRIC_CONTENT = 18
    BILE = 19
    URINE = 20
    ARTERY = 21
    VEIN = 22
    PORTAL = 23
    BONE = 24
    DISC = 25
    CSF = 26
    CARTILAGE = 27
    LUNG = 28
    LUNG_VESSEL = 29
    MYOCARDIUM = 30
    BLOOD = 31
    TABLE = 32


# tissue: (native, arterial, portal_venous, delayed) HU, fine texture SD, medium texture SD
_HU_TABLE: dict[_T, tuple[tuple[float, float, float, float], float, float]] = {
    _T.AIR: ((-1000, -1000, -1000, -1000), 0, 0),
    _T.FAT: ((-100, -100, -100, -100), 10, 8),
    _T.SKIN: ((25, 30, 30, 30), 8, 4),
    _T.MUSCLE: ((48, 55, 60, 55), 10, 5),
    _T.VISCERAL_FAT: ((-95, -95, -95, -95), 14, 14),
    _T.BOWEL_WALL: ((40, 90, 80, 60), 10, 6),
    _T.BOWEL_FLUID: ((12, 12, 12, 12), 8, 8),
    _T.GAS: ((-960, -960, -960, -960), 20, 10),
    _T.FECES: ((-60, -60, -60, -60), 140, 60),
    _T.ORAL_CONTRAST: ((300, 300, 300, 300), 40, 30),
    _T.LIVER: ((58, 72, 112, 88), 7, 5),
    _T.LIVER_VESSEL: ((38, 60, 175, 110), 8, 4),
    _T.SPLEEN: ((48, 115, 120, 92), 7, 6),
    _T.KIDNEY_CORTEX: ((33, 210, 175, 135), 8, 6),
    _T.KIDNEY_MEDULLA: ((30, 90, 160, 150), 8, 6),
    _T.COLLECTING: ((8, 8, 10, 600), 6, 40),
    _T.PANCREAS: ((42, 125, 98, 72), 14, 10),
    _T.STOMACH_WALL: ((40, 105, 90, 70), 8, 5),
    _T.GASTRIC_CONTENT: ((18, 18, 18, 18), 14, 14),
    _T.BILE: ((10, 10, 10, 12), 5, 3),
    _T.URINE: ((8, 8, 8, 12), 5, 3),
    _T.ARTERY: ((42, 330, 175, 115), 10, 4),
    _T.VEIN: ((40, 85, 155, 115), 10, 6),
    _T.PORTAL: ((40, 130, 185, 115), 10, 4),
    _T.BONE: ((230, 230, 230, 230), 45, 35),
    _T.DISC: ((85, 88, 90, 88), 10, 5),
    _T.CSF: ((18, 18, 20, 22), 6, 3),
    _T.CARTILAGE: ((130, 130, 130, 130), 15, 8),
    _T.LUNG: ((-860, -855, -855, -855), 25, 20),
    _T.LUNG_VESSEL: ((35, 160, 150, 110), 15, 5),
    _T.MYOCARDIUM: ((45, 120, 110, 90), 8, 4),
    _T.BLOOD: ((42, 300, 165, 115), 8, 3),
    _T.TABLE: ((250, 250, 250, 250), 20, 5),
}

# enhancement (HU above native) gets scaled per phantom, the rest jitters by a few HU
_CORTICAL_HU = 950.0


# ----------------------------------------------------------------------------- primitives
def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation matrix about a unit ``axis`` by ``angle`` radians (Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _frame(w: np.ndarray, u_hint: np.ndarray) -> np.ndarray:
    """Orthonormal frame (columns u, v, w) with ``w`` along the given direction."""
    w = np.asarray(w, dtype=np.float64)
    w = w / np.linalg.norm(w)
    u = np.asarray(u_hint, dtype=np.float64)
    u = u - w * (u @ w)
    u = u / np.linalg.norm(u)
    return np.stack([u, np.cross(w, u), w], axis=1)


@dataclass
class _Blob:
    """Superquadric with optional taper and surface bumps, in a local frame.

    ``level(x, y, z) < 1`` inside. Local coordinates are ``u, v, w`` (columns of ``frame``);
    ``taper`` scales the ``u, v`` radii by ``1 + taper * w / radii[2]``.
    """

    center: np.ndarray
    radii: np.ndarray
    frame: np.ndarray = field(default_factory=lambda: np.eye(3))
    exponent_xy: float = 2.0
    exponent_z: float = 2.0
    taper: float = 0.0
    bumps: np.ndarray | None = None  # (m, 5): wave vector (3), phase, amplitude in normalized units

    def extent(self) -> float:
        bump = 0.0 if self.bumps is None else float(np.abs(self.bumps[:, 4]).sum())
        return float(np.max(self.radii)) * (1.0 + abs(self.taper)) * (1.0 + bump) + 2.0

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        dx, dy, dz = x - self.center[0], y - self.center[1], z - self.center[2]
        f = self.frame
        u = (dx * f[0, 0] + dy * f[1, 0] + dz * f[2, 0]) / self.radii[0]
        v = (dx * f[0, 1] + dy * f[1, 1] + dz * f[2, 1]) / self.radii[1]
        w = (dx * f[0, 2] + dy * f[1, 2] + dz * f[2, 2]) / self.radii[2]
        if self.taper:
            scale = np.maximum(1.0 + self.taper * w, 0.2)
            u, v = u / scale, v / scale
        ex, ez = self.exponent_xy, self.exponent_z
        if ex == 2.0:
            rxy2 = u * u + v * v
            rxy = rxy2 if ez == 2.0 else np.sqrt(rxy2) ** ez
        else:
            rxy = (np.abs(u) ** ex + np.abs(v) ** ex) ** (ez / ex)
        level = (rxy + (w * w if ez == 2.0 else np.abs(w) ** ez)) ** (1.0 / ez)
        if self.bumps is not None:
            for kx, ky, kz, phase, amp in self.bumps:
                level = level - amp * np.sin(kx * u + ky * v + kz * w + phase)
        return level


@dataclass
class _Tube:
    """Union of capsules along a polyline with linearly varying radius; ``distance`` is in mm."""

    points: np.ndarray  # (n, 3)
    radii: np.ndarray  # (n,)

    def bounds(self, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        r = float(np.max(self.radii)) + margin
        return self.points.min(axis=0) - r, self.points.max(axis=0) + r


def _segment_distance(x, y, z, a, b, ra, rb):
    ab = b - a
    length2 = float(ab @ ab) or 1e-9
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / length2
    t = np.clip(t, 0.0, 1.0)
    px, py, pz = x - a[0] - t * ab[0], y - a[1] - t * ab[1], z - a[2] - t * ab[2]
    return np.sqrt(px * px + py * py + pz * pz) - (ra + t * (rb - ra))


def _bumps(rng: np.random.Generator, n: int, amplitude: float, frequency: float = 2.5) -> np.ndarray:
    out = np.empty((n, 5))
    out[:, :3] = rng.normal(0.0, frequency, (n, 3))
    out[:, 3] = rng.uniform(0, 2 * np.pi, n)
    out[:, 4] = rng.uniform(0.3, 1.0, n) * amplitude / max(n, 1) ** 0.5
    return out


# ----------------------------------------------------------------------------- noise fields
def _smooth_noise(shape: tuple[int, ...], sigma_vox: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise with unit SD; large sigmas are drawn on a coarser grid."""
    sigma_vox = np.maximum(np.asarray(sigma_vox, dtype=np.float64), 1e-3)
    factor = np.maximum(1, np.floor(sigma_vox / 2.0)).astype(int)
    coarse_shape = tuple(int(math.ceil(n / f)) + 2 for n, f in zip(shape, factor))
    noise = rng.standard_normal(coarse_shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma_vox / factor, mode="wrap", truncate=3.0)
    for axis, f in enumerate(factor):
        if f == 1:
            continue
        pos = np.arange(shape[axis]) / f
        i0 = np.floor(pos).astype(int)
        frac = (pos - i0).astype(np.float32)
        sl = [None] * noise.ndim
        sl[axis] = slice(None)
        frac = frac[tuple(sl)]
        noise = np.take(noise, i0, axis=axis) * (1 - frac) + np.take(noise, i0 + 1, axis=axis) * frac
    noise = noise[tuple(slice(0, n) for n in shape)]
    std = float(noise.std()) or 1.0
    return ((noise - float(noise.mean())) / std).astype(np.float32)


# ----------------------------------------------------------------------------- the canvas
class _Canvas:
    """Voxel-centre coordinates of a grid in the nominal patient frame, plus tissue and label maps.

    ``x, y, z`` are the deformed nominal coordinates at which shapes are evaluated; ``y_world``
    is the undeformed patient ``y`` (gravity acts along it: gas rises to small ``y``).
    """

    def __init__(self, grid: Volume, offset: np.ndarray, scale: np.ndarray, deformation: np.ndarray):
        self.grid = grid
        shape = grid.shape
        linear = grid.direction * grid.spacing[None, :]
        axes = [np.arange(n, dtype=np.float32) for n in shape]
        coords = []
        for row in range(3):
            c = (np.float32(grid.origin[row] - offset[row])
                 + axes[0][:, None, None] * np.float32(linear[row, 0])
                 + axes[1][None, :, None] * np.float32(linear[row, 1])
                 + axes[2][None, None, :] * np.float32(linear[row, 2]))
            coords.append((c / np.float32(scale[row])).astype(np.float32))
        self.y_world = coords[1]
        self.deform_amplitude = float(np.abs(deformation[:, 4:7]).sum(axis=0).max()) if len(deformation) else 0.0
        displaced = [c.copy() for c in coords]
        for kx, ky, kz, phase, ax, ay, az in deformation:
            s = np.sin(kx * coords[0] + ky * coords[1] + kz * coords[2] + np.float32(phase))
            displaced[0] += np.float32(ax) * s
            displaced[1] += np.float32(ay) * s
            displaced[2] += np.float32(az) * s
        self.x, self.y, self.z = displaced
        self.offset, self.scale = offset, scale
        self.tissue = np.full(shape, _T.AIR, dtype=np.uint8)
        self.labels = np.zeros(shape, dtype=np.uint8)
        self.hu_offset = np.zeros(shape, dtype=np.float32)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices covering the nominal-frame box ``[lo, hi]`` (plus the deformation margin)."""
        margin = self.deform_amplitude + 1.0
        lo = np.asarray(lo, dtype=np.float64) - margin
        hi = np.asarray(hi, dtype=np.float64) + margin
        corners = np.array([[(lo, hi)[a][0], (lo, hi)[b][1], (lo, hi)[c][2]]
                            for a in (0, 1) for b in (0, 1) for c in (0, 1)])
        index = self.grid.physical_to_index(self.offset + corners * self.scale)
        start = np.maximum(np.floor(index.min(axis=0)).astype(int) - 1, 0)
        stop = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 2, self.grid.shape)
        if np.any(stop <= start):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))  # type: ignore[return-value]

    def coords(self, sl):
        return self.x[sl], self.y[sl], self.z[sl]

    def paint(self, sl, mask: np.ndarray, tissue: _T, label: int = 0) -> None:
        self.tissue[sl][mask] = tissue
        self.labels[sl][mask] = label
        self.hu_offset[sl][mask] = 0.0

    def blob_mask(self, blob: _Blob, inflate: float = 0.0):
        r = blob.extent() + inflate
        sl = self.box(blob.center - r, blob.center + r)
        if sl is None:
            return None, None
        level = blob.level(*self.coords(sl))
        return sl, level

    def tube_distance(self, tube: _Tube, margin: float = 0.0):
        lo, hi = tube.bounds(margin)
        sl = self.box(lo, hi)
        if sl is None:
            return None, None
        dist = np.full(self.x[sl].shape, np.inf, dtype=np.float32)
        base = [s.start for s in sl]
        pts, radii = tube.points, tube.radii
        for a, b, ra, rb in zip(pts[:-1], pts[1:], radii[:-1], radii[1:]):
            r = max(ra, rb) + margin
            seg = self.box(np.minimum(a, b) - r, np.maximum(a, b) + r)
            if seg is None:
                continue
            local = tuple(slice(max(s.start, t.start) - o, min(s.stop, t.stop) - o)
                          for s, t, o in zip(seg, sl, base))
            if any(s.stop <= s.start for s in local):
                continue
            glob = tuple(slice(s.start + o, s.stop + o) for s, o in zip(local, base))
            d = _segment_distance(*self.coords(glob), a, b, ra, rb)
            np.minimum(dist[local], d, out=dist[local])
        return sl, dist


# ----------------------------------------------------------------------------- anatomy
class _Anatomy:
    """Randomly drawn patient anatomy in the nominal frame (mm, LPS, L3 centre at z = 0)."""

    def __init__(self, rng: np.random.Generator):
        u = rng.uniform
        self.scale = np.array([u(0.9, 1.1), u(0.9, 1.1), u(0.92, 1.08)])
        self.offset = np.array([u(-60, 60), u(-60, 60) + 150.0, u(-700, 500)])
        # spine levels
        p = u(32.0, 38.0)
        pt = p * u(0.8, 0.88)
        self.pitch = p
        levels = {"L5": -2 * p, "L4": -p, "L3": 0.0, "L2": p, "L1": 2 * p}
        levels["T12"] = 2 * p + (p + pt) / 2
        for i, name in enumerate(("T11", "T10", "T9", "T8", "T7")):
            levels[name] = levels["T12"] + (i + 1) * pt
        self.levels = levels
        self.lordosis = u(4.0, 14.0)
        self.scoliosis = (u(-6, 6), u(150, 400), u(0, 2 * np.pi))
        # diaphragm
        self.apex_r = levels["T10"] + u(-20, 8)
        self.apex_l = self.apex_r - u(5, 22)
        self.dome_depth = u(80, 105)
        # pelvis
        self.z_fh = levels["L5"] - u(120, 145)
        # body outline knots (inner cavity, wall thickness, fat)
        z = [self.z_fh - 60, self.z_fh, levels["L5"] - 60, levels["L5"], 0.0, levels["L1"],
             self.apex_r - 30, self.apex_r + 80]
        w = u(0.9, 1.1)
        d = u(0.9, 1.1)
        self.knots = np.array(z)
        self.a_in = w * np.array([70, 88, 108, 120, 122, 125, 128, 124.0])
        self.b_ant_in = d * np.array([75, 84, 88, 92, 94, 98, 104, 100.0]) * u(0.95, 1.15)
        self.b_post_in = np.array([55, 58, 62, 80, 88, 88, 84, 80.0])
        self.wall_lat = np.array([55, 62, 38, 18, 14, 14, 15, 16.0]) * u(0.8, 1.3)
        self.wall_ant = np.array([25, 20, 12, 10, 10, 10, 12, 15.0]) * u(0.8, 1.3)
        self.wall_post = np.array([62, 58, 50, 38, 34, 34, 30, 30.0]) * u(0.9, 1.2)
        fat = u(6.0, 42.0)
        self.fat_lat = fat * u(0.8, 1.3)
        self.fat_ant = fat * u(1.0, 1.7)
        self.fat_post = fat * u(0.5, 0.9)
        self.body_exponent = u(2.1, 2.6)
        self.table_gap = u(0, 8)
        # z range of the anatomy (full field of view)
        self.z_range = (self.z_fh - 45.0, self.apex_r + u(35, 55))
        # global smooth deformation (wave vector, phase, displacement amplitude)
        n = 4
        k = rng.normal(size=(n, 3))
        k *= (2 * np.pi / rng.uniform(140, 320, n) / np.linalg.norm(k, axis=1))[:, None]
        amp = rng.normal(0, 2.5, (n, 3))
        self.deformation = np.concatenate([k, rng.uniform(0, 2 * np.pi, (n, 1)), amp], axis=1)
        # contrast
        self.phase = CONTRAST_PHASES[int(rng.choice(len(CONTRAST_PHASES), p=_PHASE_PROBABILITIES))]
        self.enhancement = u(0.75, 1.25)
        self.oral_contrast = bool(u() < 0.15)
        self.noise_sd = u(6.0, 22.0)
        self.tissue_jitter = rng.normal(0, 5.0, len(_T))
        self._draw_organs(rng)

    # spine geometry -----------------------------------------------------------------
    def spine_y(self, z: float) -> float:
        return 30.0 - self.lordosis * math.exp(-((z + 20.0) / 75.0) ** 2) + 0.06 * max(z - 80.0, 0.0)

    def spine_x(self, z: float) -> float:
        amp, wavelength, phase = self.scoliosis
        return amp * math.sin(2 * np.pi * z / wavelength + phase)

    def table_y(self) -> float:
        """Patient ``y`` of the table top: the back lies flat on it."""
        return float(np.min(self.b_post_in + self.wall_post) + self.fat_post) * 0.97

    def diaphragm(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height of the diaphragm (two domes) above each ``(x, y)``."""
        depth = self.dome_depth
        out = None
        for apex, xa in ((self.apex_r, -55.0), (self.apex_l, 60.0)):
            dy = y + 10.0
            ry = np.where(dy > 0, 100.0, 135.0)
            h = apex - depth * (((x - xa) / 115.0) ** 2 + (dy / ry) ** 2)
            out = h if out is None else np.maximum(out, h)
        return out

    def _draw_organs(self, rng: np.random.Generator) -> None:
        u, nrm = rng.uniform, rng.normal
        L = self.levels
        self.organs: dict[str, object] = {}
        j = lambda s=6.0: nrm(0, s, 3)  # noqa: E731  position jitter

        # liver: right lobe + left lobe
        self.liver_right = _Blob(np.array([-62, 5, 0.5 * (L["L2"] + self.apex_r) + 10]) + j(),
                                 np.array([80, 88, 0.5 * (self.apex_r - L["L2"]) + 35]) * u(0.9, 1.1, 3),
                                 _frame([0.1, 0.15, 1], [1, 0, 0]), 2.3, 2.0, taper=0.35,
                                 bumps=_bumps(rng, 4, 0.12))
        self.liver_left = _Blob(np.array([8, -50, self.apex_l - 40]) + j(),
                                np.array([65, 42, 38]) * u(0.75, 1.2, 3),
                                _frame([0.1, 0.3, 1], [1, 0.2, 0]), 2.2, 2.0, taper=0.2,
                                bumps=_bumps(rng, 3, 0.12))
        # spleen: against the left posterolateral wall, thin axis towards the hilum
        spleen_scale = u(0.75, 1.25)
        self.spleen = _Blob(np.array([88, 45, L["T12"] - 5]) + j(5),
                            np.array([24, 50, 55]) * spleen_scale * u(0.9, 1.1, 3),
                            _frame([0.25, 0.35, 1], [-0.85, -0.5, 0]), 2.0, 2.0,
                            bumps=_bumps(rng, 3, 0.1))
        self.spleen_notch = _Blob(self.spleen.center + np.array([-42, -30, 0]) * spleen_scale,
                                  np.array([32, 32, 60]) * spleen_scale)
        # kidneys: hilum anteromedial, upper pole medial and posterior
        self.kidneys = {}
        for name, side, zc in (("kidney_left", 1.0, L["L1"] - 12), ("kidney_right", -1.0, L["L1"] - 30)):
            center = np.array([side * 70, 60, zc]) + j(5)
            frame = _frame([-0.2 * side, 0.15, 1], [-side * 0.82, -0.57, 0])
            radii = np.array([28, 21, 56]) * u(0.85, 1.15) * u(0.93, 1.07, 3)
            blob = _Blob(center, radii, frame, 2.0, 2.0, bumps=_bumps(rng, 2, 0.06))
            sinus = _Blob(center + frame[:, 0] * radii[0] * 0.6, radii * np.array([0.55, 0.5, 0.5]), frame)
            pelvis = _Blob(center + frame[:, 0] * radii[0] * 0.75, radii * np.array([0.35, 0.3, 0.22]), frame)
            self.kidneys[name] = (blob, sinus, pelvis)
        # stomach: fundus under the left dome, body anterior, antrum crossing to the right
        dist = u(0.55, 1.1)
        self.stomach = _Tube(np.array([[50, 20, self.apex_l - 25], [62, -12, self.apex_l - 60],
                                       [48, -50, L["L1"] - 5], [8, -62, L["L1"] - 15], [-25, -48, L["L1"] - 10]])
                             + nrm(0, 5, (5, 3)),
                             np.array([34, 36, 30, 20, 11]) * dist)
        self.gas_fraction = u(0.0, 0.45)
        self.duodenum = _Tube(np.array([[-25, -48, L["L1"] - 10], [-45, -25, L["L1"] - 15], [-48, -15, L["L3"] + 5],
                                        [-20, -8, L["L3"] - 10], [15, -15, L["L3"] - 5]]) + nrm(0, 4, (5, 3)),
                              np.array([11, 12, 12, 11, 10]) * u(0.8, 1.2))
        # pancreas: head by the duodenum, body anterior to the aorta, tail to the splenic hilum
        self.pancreas = _Tube(np.array([[-35, -25, L["L2"] - 5], [-8, -42, L["L2"] + 8], [28, -28, L["L1"]],
                                        [60, 8, L["L1"] + 20], [72, 22, L["L1"] + 28]]) + nrm(0, 4, (5, 3)),
                              np.array([17, 11, 12, 10, 7]) * u(0.8, 1.15))
        # gallbladder under the liver
        self.gallbladder = _Blob(np.array([-48, -52, L["L2"] + 8]) + j(6),
                                 np.array([16, 15, 36]) * u(0.6, 1.2) * u(0.9, 1.1, 3),
                                 _frame([0.3, 0.5, 1], [1, 0, 0]), 2.0, 2.0, taper=-0.35)
        # bladder behind the pubic symphysis
        fill = u(0.55, 1.25)
        self.bladder = _Blob(np.array([0, -45, self.z_fh + 20]) + j(6), np.array([45, 36, 34]) * fill,
                             np.eye(3), 2.3, 2.4, bumps=_bumps(rng, 2, 0.05))
        # vessels
        zb = L["L4"] + u(-10, 15)  # aortic bifurcation
        zt = self.z_range[1] + 20
        ys = self.spine_y
        self.aorta = _Tube(np.array([[24, ys(zt) - 5, zt], [12, ys(L["T11"]) - 20, L["T11"]],
                                     [9, ys(L["L1"]) - 27, L["L1"]], [8, ys(L["L3"]) - 28, L["L3"]],
                                     [5, ys(zb) - 27, zb]]) + nrm(0, 2, (5, 3)) * [1, 1, 0],
                           np.array([12, 12, 11, 10, 9]) * u(0.85, 1.2))
        zc = L["L5"] + u(-5, 15)  # caval confluence
        self.ivc = _Tube(np.array([[-20, ys(zc) - 20, zc], [-22, ys(L["L3"]) - 24, L["L3"]],
                                   [-24, ys(L["L1"]) - 28, L["L1"]], [-28, ys(L["T11"]) - 28, L["T11"]],
                                   [-15, -18, self.apex_r + 15]]) + nrm(0, 2, (5, 3)) * [1, 1, 0],
                         np.array([10, 11, 12, 12, 13]) * u(0.8, 1.15))
        self.iliac_arteries = [
            _Tube(np.array([[5, ys(zb) - 27, zb], [s * 45, 15, zb - 60], [s * 75, -15, self.z_fh + 10],
                            [s * 85, -35, self.z_fh - 60]]), np.array([7, 7, 6, 6])) for s in (-1, 1)]
        self.iliac_veins = [
            _Tube(np.array([[-20, ys(zc) - 20, zc], [s * 45, 28, zc - 60], [s * 75, -3, self.z_fh + 8],
                            [s * 85, -22, self.z_fh - 60]]), np.array([9, 9, 8, 8])) for s in (-1, 1)]
        conf = self.pancreas.points[1] + np.array([-2, 14, 0])
        self.portal = [
            _Tube(np.array([conf, [-40, -12, L["L1"] + 22], [-65, -5, L["L1"] + 40]]), np.array([8, 8, 6])),
            _Tube(np.array([[-40, -12, L["L1"] + 22], [-10, -40, L["T12"] + 25]]), np.array([6, 5])),
            _Tube(np.array([conf, [30, -12, L["L1"] + 2], [62, 18, L["L1"] + 20], [80, 30, L["T12"] - 10]]),
                  np.array([5, 5, 5, 5])),
            _Tube(np.array([conf, [-10, -48, L["L3"] - 20]]), np.array([6, 6])),
        ]
        self.sma = _Tube(np.array([[8, ys(L["L1"]) - 35, L["L1"] - 5], [4, -38, L["L2"]], [0, -50, L["L4"]]]),
                         np.array([4, 4, 3.5]))
        kl, kr = self.kidneys["kidney_left"][0].center, self.kidneys["kidney_right"][0].center
        self.renal_veins = [
            _Tube(np.array([kl + [-22, -12, 0], [15, ys(L["L2"]) - 40, L["L1"] - 15], [-22, ys(L["L1"]) - 28,
                                                                                      L["L1"] - 15]]),
                  np.array([5, 5, 6])),
            _Tube(np.array([kr + [22, -12, 0], [-24, ys(L["L1"]) - 28, L["L1"] - 25]]), np.array([6, 6])),
        ]
        # bowel
        self.colon = _Tube(np.array([[-85, 10, self.z_fh + 60], [-95, 15, L["L4"]], [-92, -10, L["L1"] - 10],
                                     [-60, -70, L["L2"]], [0, -85, L["L3"] + 5], [60, -70, L["L2"] + 10],
                                     [92, 5, L["L1"] + 10], [98, 25, L["L3"]], [90, 10, L["L5"]],
                                     [45, -25, self.z_fh + 70], [5, 55, self.z_fh + 50],
                                     [0, 65, self.z_fh - 60]]) + nrm(0, 6, (12, 3)),
                           np.array([25, 24, 22, 20, 20, 20, 20, 18, 17, 16, 16, 15]) * u(0.75, 1.2))
        self.esophagus = _Tube(np.array([[6, ys(zt) - 22, zt], [14, ys(L["T10"]) - 30, L["T10"]],
                                         self.stomach.points[0] + [-25, -5, 5]]), np.array([8, 8, 9]))
        # muscles
        self.psoas = [_Tube(np.array([[s * 22, ys(L["T12"]) + 8, L["T12"]], [s * 35, ys(L["L2"]) + 8, L["L2"]],
                                      [s * 48, ys(L["L4"]) + 5, L["L4"]], [s * 68, 0, self.z_fh + 50],
                                      [s * 82, -25, self.z_fh]]), np.array([5, 11, 18, 18, 15]) * u(0.8, 1.2))
                      for s in (-1, 1)]
        self.quadratus = [_Tube(np.array([[s * 55, 78, L["T12"]], [s * 65, 78, L["L3"]], [s * 70, 70, L["L5"] + 10]]),
                                np.array([8, 14, 9])) for s in (-1, 1)]
        self.paraspinal = [_Tube(np.array([[s * 36, ys(zt) + 55, zt], [s * 38, ys(L["L1"]) + 58, L["L1"]],
                                           [s * 36, ys(L["L4"]) + 60, L["L4"]], [s * 28, 85, self.z_fh + 30]]),
                                 np.array([25, 26, 27, 15]) * u(0.85, 1.15)) for s in (-1, 1)]
        self.heart = _Blob(np.array([18, -40, 0.5 * (self.apex_r + self.apex_l) + 45]) + j(5),
                           np.array([70, 52, 58]) * u(0.9, 1.1), _frame([0.3, -0.4, 1], [1, -0.5, 0]))
        self.fissure = (u(-75, -45), u(0.8, 1.3))
        self.centers = {
            "liver": self.liver_right.center, "spleen": self.spleen.center,
            "kidney_left": self.kidneys["kidney_left"][0].center,
            "kidney_right": self.kidneys["kidney_right"][0].center,
            "stomach": self.stomach.points[1], "gallbladder": self.gallbladder.center,
            "pancreas": self.pancreas.points[2], "aorta": self.aorta.points[2],
            "inferior_vena_cava": self.ivc.points[2], "urinary_bladder": self.bladder.center,
            "lung_lower_lobe_left": np.array([85.0, 40.0, self.apex_l - 10]),
            "lung_lower_lobe_right": np.array([-85.0, 40.0, self.apex_r - 10]),
        }
        for name in ("T12", "L1", "L2", "L3", "L4", "L5"):
            z = L[name]
            self.centers[f"vertebrae_{name}"] = np.array([self.spine_x(z), self.spine_y(z), z])

    # painting ------------------------------------------------------------------------
    def paint(self, c: _Canvas, rng: np.random.Generator) -> None:
        self._paint_body(c)
        self._paint_bowel(c, rng)
        self._paint_muscles(c)
        self._paint_thorax(c)
        self._paint_organs(c)
        self._paint_vessels(c)
        self._paint_spine(c)
        self._paint_pelvis_and_ribs(c)

    def _outline(self, c: _Canvas):
        z, x, y = c.z, c.x, c.y
        interp = lambda values: np.interp(z, self.knots, values).astype(np.float32)  # noqa: E731
        a_in, b_ant, b_post = interp(self.a_in), interp(self.b_ant_in), interp(self.b_post_in)
        n = np.float32(self.body_exponent)
        ax, ay = np.abs(x), np.abs(y)
        post = y > 0

        def level(a, b_a, b_p, n_post):
            b = np.where(post, b_p, b_a)
            e = np.where(post, n_post, n)
            return ((ax / a) ** e + (ay / b) ** e) ** (1.0 / e)

        r_in = level(a_in, b_ant, b_post, n)
        a_core = a_in + interp(self.wall_lat)
        ba_core = b_ant + interp(self.wall_ant)
        bp_core = b_post + interp(self.wall_post)
        r_core = level(a_core, ba_core, bp_core, np.float32(3.0))
        r_skin = level(a_core + np.float32(self.fat_lat), ba_core + np.float32(self.fat_ant),
                       bp_core + np.float32(self.fat_post), np.float32(3.0))
        rho = np.sqrt(x * x + y * y)
        return r_in, r_core, r_skin, rho

    def _paint_body(self, c: _Canvas) -> None:
        r_in, r_core, r_skin, rho = self._outline(c)
        # the back lies flat on the table
        post_max = self.table_y()
        body = (r_skin < 1) & (c.y < post_max)
        depth = np.where(r_skin > 0, rho * (1 / np.maximum(r_skin, 1e-3) - 1), 1e3)
        depth = np.minimum(depth, post_max - c.y)
        c.tissue[body] = _T.FAT
        c.tissue[body & (r_core < 1)] = _T.MUSCLE
        c.tissue[body & (depth < 2.0)] = _T.SKIN
        yw = c.y_world
        table = (yw > post_max + self.table_gap) & (yw < post_max + self.table_gap + 7) & (np.abs(c.x) < 210)
        c.tissue[table] = _T.TABLE
        self.cavity = r_in < 1
        c.tissue[self.cavity & body] = _T.VISCERAL_FAT
        self.out_in = rho * (1 - 1 / np.maximum(r_in, 1e-3))  # mm outside the inner outline
        self.z_d = self.diaphragm(c.x, c.y).astype(np.float32)
        self.abdomen = self.cavity & (c.z < self.z_d - 3.5)
        self.chest = self.cavity & (c.z > self.z_d + 3.5)
        c.tissue[self.cavity & ~self.abdomen & ~self.chest] = _T.MUSCLE

    def _paint_bowel(self, c: _Canvas, rng: np.random.Generator) -> None:
        L = self.levels
        lo = np.array([-130, -110, self.z_fh + 10])
        hi = np.array([130, 40, L["L1"] + 10])
        sl = c.box(lo, hi)
        if sl is not None:
            x, y, z = c.coords(sl)
            region = self.abdomen[sl] & (y < 15 + 0.25 * np.abs(x)) & (z > self.z_fh + 10) & (z < L["L1"] + 10)
            spacing = c.grid.spacing
            n1 = _smooth_noise(region.shape, 6.0 / spacing, rng)
            n2 = _smooth_noise(region.shape, 18.0 / spacing, rng)
            wall = region & (n1 > 0.0)
            lumen = region & (n1 > 0.45)
            c.paint(sl, wall, _T.BOWEL_WALL)
            content = _T.ORAL_CONTRAST if self.oral_contrast else _T.BOWEL_FLUID
            c.paint(sl, lumen, content)
            c.paint(sl, lumen & (n2 > 1.7), _T.GAS)
        sl, d = c.tube_distance(self.colon)
        if sl is not None:
            inside = self.cavity[sl]
            c.paint(sl, inside & (d < 0), _T.BOWEL_WALL)
            lumen = inside & (d < -3.0)
            c.paint(sl, lumen, _T.FECES)
            gas_level = np.percentile(c.y_world[sl][lumen], 35) if lumen.any() else 0.0
            c.paint(sl, lumen & (c.y_world[sl] < gas_level - 5), _T.GAS)

    def _paint_muscles(self, c: _Canvas) -> None:
        for tube in (*self.psoas, *self.quadratus, *self.paraspinal):
            sl, d = c.tube_distance(tube)
            if sl is not None:
                c.paint(sl, (d < 0) & (c.z[sl] < self.z_d[sl] + 40), _T.MUSCLE)

    def _paint_thorax(self, c: _Canvas) -> None:
        chest = self.chest
        if not chest.any():
            return
        lung = chest & (np.abs(c.x) > 6)
        c.tissue[lung] = _T.LUNG
        offset, slope = self.fissure
        for name, side, apex in (("lung_lower_lobe_left", 1, self.apex_l), ("lung_lower_lobe_right", -1, self.apex_r)):
            lower = lung & (side * c.x > 0) & (c.y > offset + slope * (c.z - apex))
            c.labels[lower] = PHANTOM_LABELS[name]
        heart = self.heart
        sl, level = c.blob_mask(heart, inflate=10)
        if sl is not None:
            above = c.z[sl] > self.z_d[sl] + 2
            c.paint(sl, above & (level < 1.12), _T.VISCERAL_FAT)
            c.paint(sl, above & (level < 1.0), _T.MYOCARDIUM)
            c.paint(sl, above & (level < 0.78), _T.BLOOD)

    def _paint_organs(self, c: _Canvas) -> None:
        # liver
        masks = []
        for blob in (self.liver_right, self.liver_left):
            sl, level = c.blob_mask(blob)
            if sl is not None:
                x, y = c.x[sl], c.y[sl]
                keep = self.abdomen[sl] & ~(((x - 5) / 40) ** 2 + ((y - 50) / 45) ** 2 < 1)
                masks.append((sl, (level < 1) & keep))
        for sl, m in masks:
            c.paint(sl, m, _T.LIVER, PHANTOM_LABELS["liver"])
        # spleen
        sl, level = c.blob_mask(self.spleen)
        if sl is not None:
            notch = self.spleen_notch.level(*c.coords(sl))
            c.paint(sl, (level < 1) & (notch > 1) & self.abdomen[sl], _T.SPLEEN, PHANTOM_LABELS["spleen"])
        # kidneys with perirenal fat, cortex, medulla, sinus and pelvis
        for name, (blob, sinus, pelvis) in self.kidneys.items():
            sl, level = c.blob_mask(blob, inflate=12)
            if sl is None:
                continue
            inside = self.abdomen[sl]
            c.paint(sl, inside & (level < 1.0 + 10.0 / blob.radii.min()), _T.FAT)
            kidney = inside & (level < 1)
            sinus_level = sinus.level(*c.coords(sl))
            parenchyma = kidney & (sinus_level > 1)
            c.paint(sl, parenchyma, _T.KIDNEY_MEDULLA, PHANTOM_LABELS[name])
            depth = ndimage.distance_transform_edt(parenchyma, sampling=c.grid.spacing)
            c.paint(sl, parenchyma & (depth < 6.0), _T.KIDNEY_CORTEX, PHANTOM_LABELS[name])
            c.paint(sl, kidney & (sinus_level <= 1), _T.FAT)
            c.paint(sl, kidney & (pelvis.level(*c.coords(sl)) < 1), _T.COLLECTING)
        # stomach: wall, fluid and an anterior gas cap (patient supine)
        sl, d = c.tube_distance(self.stomach)
        if sl is not None:
            inside = self.abdomen[sl] & (d < 0)
            c.paint(sl, inside, _T.STOMACH_WALL, PHANTOM_LABELS["stomach"])
            lumen = inside & (d < -4.0)
            content = _T.ORAL_CONTRAST if self.oral_contrast else _T.GASTRIC_CONTENT
            c.paint(sl, lumen, content, PHANTOM_LABELS["stomach"])
            if lumen.any() and self.gas_fraction > 0.02:
                level = np.quantile(c.y_world[sl][lumen], self.gas_fraction)
                c.paint(sl, lumen & (c.y_world[sl] < level), _T.GAS, PHANTOM_LABELS["stomach"])
        sl, d = c.tube_distance(self.duodenum)
        if sl is not None:
            inside = self.abdomen[sl]
            c.paint(sl, inside & (d < 0), _T.BOWEL_WALL)
            c.paint(sl, inside & (d < -3), _T.BOWEL_FLUID)
        # pancreas
        sl, d = c.tube_distance(self.pancreas)
        if sl is not None:
            c.paint(sl, self.abdomen[sl] & (d < 0), _T.PANCREAS, PHANTOM_LABELS["pancreas"])
        # gallbladder
        sl, level = c.blob_mask(self.gallbladder)
        if sl is not None:
            c.paint(sl, self.abdomen[sl] & (level < 1), _T.BILE, PHANTOM_LABELS["gallbladder"])
        # bladder: wall and urine
        sl, level = c.blob_mask(self.bladder)
        if sl is not None:
            inside = self.cavity[sl] & (level < 1)
            c.paint(sl, inside, _T.MUSCLE, PHANTOM_LABELS["urinary_bladder"])
            c.paint(sl, inside & (level < 1 - 3.0 / self.bladder.radii.min()), _T.URINE,
                    PHANTOM_LABELS["urinary_bladder"])

    def _paint_vessels(self, c: _Canvas) -> None:
        tubes = [(t, _T.ARTERY, 0) for t in (*self.iliac_arteries, self.sma)]
        tubes += [(t, _T.VEIN, 0) for t in (*self.iliac_veins, *self.renal_veins)]
        tubes += [(t, _T.PORTAL, 0) for t in self.portal]
        tubes += [(self.esophagus, _T.MUSCLE, 0)]
        tubes += [(self.aorta, _T.ARTERY, PHANTOM_LABELS["aorta"])]
        tubes += [(self.ivc, _T.VEIN, PHANTOM_LABELS["inferior_vena_cava"])]
        for tube, tissue, label in tubes:
            sl, d = c.tube_distance(tube)
            if sl is None:
                continue
            mask = (d < 0) & self.cavity[sl]
            if label == PHANTOM_LABELS["inferior_vena_cava"]:
                mask &= c.z[sl] < self.z_d[sl] + 8  # the IVC ends at the right atrium
            c.paint(sl, mask, tissue, label)

    def _paint_spine(self, c: _Canvas) -> None:
        L = self.levels
        names = ["T7", "T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"]
        z_lo, z_hi = L["L5"] - 40, L["T7"] + 30
        lo = np.array([-70, -10, z_lo])
        hi = np.array([70, 110, z_hi])
        sl = c.box(lo, hi)
        if sl is None:
            return
        x, y, z = c.coords(sl)
        canal_pts = np.array([[self.spine_x(zz), self.spine_y(zz) + 28, zz] for zz in np.linspace(z_lo, z_hi, 8)])
        d = np.full(x.shape, np.inf, dtype=np.float32)
        for a, b in zip(canal_pts[:-1], canal_pts[1:]):
            d = np.minimum(d, _segment_distance(x, y, z, a, b, 8.0, 8.0))
        c.paint(sl, d < 0, _T.CSF)
        spine_box = sl
        for index, name in enumerate(names):
            zc = L[name]
            thoracic = name.startswith("T")
            pitch = self.pitch * (0.85 if thoracic else 1.0)
            sl = c.box(np.array([-75, -20, zc - pitch]), np.array([75, 120, zc + pitch]))
            if sl is None:
                continue
            x, y, z = c.coords(sl)
            bone = c.tissue[sl] == _T.BONE
            disc = 0.22 * pitch
            hz = (pitch - disc) / 2
            cx, cy = self.spine_x(zc), self.spine_y(zc)
            ax = 17 + 0.045 * (L["T12"] - zc) * 0.5 + (0 if thoracic else 2)
            ay = 14 + (0 if thoracic else 2.5)
            dx, dy, dz = x - cx, y - cy, z - zc
            near = np.abs(dz) < pitch
            rxy = np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2)
            body = near & ((rxy ** 6 + (dz / hz) ** 6) < 1)
            yc = ay + 12
            rc = np.sqrt(dx * dx + (dy - yc) ** 2)
            arch = near & (rc < 17) & (rc > 8.5) & (dy > ay * 0.4) & (np.abs(dz - 2) < hz * 0.8)
            slope = 0.6 if thoracic else 0.3
            spinous = near & (np.abs(dx) < 3.5) & (dy > yc + 8) & (dy < yc + (38 if thoracic else 32)) \
                & (np.abs(dz + slope * (dy - yc) - 2) < (7 if thoracic else 10))
            tp_len = 30 if thoracic else (18 + 8 * math.exp(-((zc - L["L3"]) / 30) ** 2))
            tp_y = yc - 3 + (0.5 * (np.abs(dx) - 10) if thoracic else 0)
            transverse = near & (np.abs(dx) > 9) & (np.abs(dx) < 9 + tp_len) & (np.abs(dy - tp_y) < 5) \
                & (np.abs(dz) < 5.5)
            vertebra = body | arch | spinous | transverse
            label = PHANTOM_LABELS.get(f"vertebrae_{name}", 0)
            c.paint(sl, vertebra, _T.BONE, label)
            bone |= vertebra
            if index + 1 < len(names):
                zd = zc - pitch / 2
                nz = np.abs(z - zd)
                disc_mask = (nz < disc / 2 + 0.5) & (np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2) < 0.97) & ~bone
                c.paint(sl, disc_mask, _T.DISC)
        # sacrum
        top = L["L5"] - self.pitch * 0.55
        sacrum = _Blob(np.array([self.spine_x(top), self.spine_y(L["L5"]) + 25, top - 55]), np.array([48, 17, 58]),
                       _frame([0, -0.55, 1], [1, 0, 0]), 2.5, 3.0, taper=0.45)
        sls, level = c.blob_mask(sacrum)
        if sls is not None:
            c.paint(sls, level < 1, _T.BONE)
            self._cortex(c, sls)
        self._cortex(c, spine_box)

    def _paint_pelvis_and_ribs(self, c: _Canvas) -> None:
        L = self.levels
        zf = self.z_fh
        for s in (-1, 1):
            # iliac wing: a curved plate lateral to the pelvic cavity
            wing = _Blob(np.array([s * 30, 5, L["L5"] - 75]), np.array([95, 72, 85]), np.eye(3), 2.0, 2.0)
            sl, level = c.blob_mask(wing)
            if sl is not None:
                x, y, z = c.coords(sl)
                plate = (np.abs(level - 1) * 72 < 4.5) & (s * x > 40) & (y > -45 + 0.4 * (z - L["L5"])) \
                    & (z < L["L5"] - 20) & (z > zf + 10)
                c.paint(sl, plate, _T.BONE)
                self._cortex(c, sl)
            # femoral head, neck, acetabulum, pubis and ischium
            head = np.array([s * 92, -12, zf])
            parts = [_Tube(np.array([head, head + [s * 30, 8, -30], head + [s * 42, 12, -120]]), np.array([15, 14, 14])),
                     _Tube(np.array([head + [-s * 10, -5, -5], [s * 8, -85, zf - 15]]), np.array([11, 9])),
                     _Tube(np.array([head + [-s * 8, 20, -10], [s * 55, 45, zf - 55]]), np.array([12, 11])),
                     _Tube(np.array([head + [-s * 12, 15, 18], [s * 45, 50, zf + 70]]), np.array([16, 12]))]
            for tube in parts:
                sl, d = c.tube_distance(tube)
                if sl is not None:
                    c.paint(sl, d < 0, _T.BONE)
            sl, d = c.tube_distance(_Tube(head[None].repeat(2, 0), np.array([24.0, 24.0])), margin=8)
            if sl is not None:
                c.paint(sl, (d < 7) & (s * c.x[sl] < s * head[0] + 4) & (c.z[sl] > zf - 15), _T.BONE)
                c.paint(sl, d < 0, _T.BONE)
                c.paint(sl, (d > 0) & (d < 1.5), _T.CARTILAGE)
                self._cortex(c, sl)
        # ribs T7..T12 in the chest wall, descending as they run forward
        band = (self.out_in > 0.5) & (self.out_in < 9.0) & (c.z > L["T12"] - 150) & (c.z < L["T7"] + 20)
        idx = np.nonzero(band)
        if idx[0].size:
            x, y, z, out = c.x[idx], c.y[idx], c.z[idx], self.out_in[idx]
            theta = np.arctan2(np.abs(x), y)  # 0 posterior, pi anterior
            tissue = np.full(x.shape, 255, dtype=np.uint8)
            for name, end in (("T7", 0.95), ("T8", 0.93), ("T9", 0.9), ("T10", 0.85), ("T11", 0.6), ("T12", 0.42)):
                z_rib = L[name] + 6 - 105 * (theta / np.pi) ** 1.3
                dz = np.abs(z - z_rib)
                rib = (dz < 5.5) & (theta > 0.35)
                tissue[rib & (theta < end * np.pi)] = _T.BONE
                tissue[rib & (theta >= end * np.pi) & (theta < 0.92 * np.pi) & (end > 0.8)] = _T.CARTILAGE
            hit = tissue != 255
            flat = tuple(i[hit] for i in idx)
            c.tissue[flat] = tissue[hit]
            c.labels[flat] = 0
            cortical = hit & (tissue == _T.BONE)
            inner = (np.abs(out - 4.7) < 2.0)
            flat_c = tuple(i[cortical & ~inner] for i in idx)
            c.hu_offset[flat_c] = (_CORTICAL_HU - 230) * 0.7

    @staticmethod
    def _cortex(c: _Canvas, sl) -> None:
        """Add a cortical shell to the bone inside ``sl`` (partial-volume weighted)."""
        bone = c.tissue[sl] == _T.BONE
        if not bone.any():
            return
        depth = ndimage.distance_transform_edt(bone, sampling=c.grid.spacing)
        step = float(np.mean(c.grid.spacing))
        weight = np.clip((1.5 + 0.5 * step - depth) / step, 0.0, 1.0)
        c.hu_offset[sl] = np.where(bone, weight * (_CORTICAL_HU - 230), c.hu_offset[sl])


# ----------------------------------------------------------------------------- grid
def _sample_grid(rng_fov: np.random.Generator, rng_orient: np.random.Generator, rng_spacing: np.random.Generator,
                 anatomy: _Anatomy, shape, spacing, random_orientation: bool, random_fov: bool,
                 max_oblique_degrees: float, spacing_range: tuple[float, float], max_voxels: int) -> Volume:
    half_x = float(anatomy.a_in.max() + anatomy.wall_lat.max() * 0.6 + anatomy.fat_lat) + 15
    y_lo = -float(anatomy.b_ant_in.max() + anatomy.wall_ant.max() + anatomy.fat_ant) - 15
    y_hi = anatomy.table_y() + anatomy.table_gap + 20
    z_lo, z_hi = anatomy.z_range
    lo, hi = np.array([-half_x, y_lo, z_lo]), np.array([half_x, y_hi, z_hi])
    center = (lo + hi) / 2
    extent = hi - lo
    if random_fov:
        margin = rng_fov.uniform(-10, 25, 3) * [1, 1, 0]
        extent = extent + 2 * margin
        if rng_fov.random() < 0.7:
            length = extent[2] * rng_fov.uniform(0.35, 1.0)
            center[2] = rng_fov.uniform(z_lo + length / 2, z_hi - length / 2)
            extent[2] = length
    center_w = anatomy.offset + center * anatomy.scale
    extent_w = extent * anatomy.scale

    perm, signs = np.arange(3), np.ones(3)
    rotation = np.eye(3)
    if random_orientation:
        perm = rng_orient.permutation(3)
        signs = rng_orient.choice([-1.0, 1.0], 3)
        if rng_orient.random() < 0.5 and max_oblique_degrees > 0:
            angle = np.deg2rad(rng_orient.uniform(0, max_oblique_degrees))
            rotation = _rotation(rng_orient.normal(size=3), angle)
    direction = np.zeros((3, 3))
    for axis in range(3):
        direction[perm[axis], axis] = signs[axis]
    direction = rotation @ direction
    axis_extent = extent_w[perm]

    if shape is None and spacing is None:
        low, high = spacing_range
        log_uniform = lambda: float(np.exp(rng_spacing.uniform(np.log(low), np.log(high))))  # noqa: E731
        s_xy = log_uniform()
        s_y = s_xy if rng_spacing.random() < 0.7 else log_uniform()
        physical = np.array([s_xy, s_y, log_uniform()])
        spacing_v = physical[perm]
        for _ in range(8):
            count = np.prod(np.ceil(axis_extent / spacing_v))
            if count <= max_voxels:
                break
            free = spacing_v < high
            grow = (count / max_voxels) ** (1.0 / max(int(free.sum()), 1))
            spacing_v = np.where(free, np.minimum(spacing_v * grow * 1.001, high), spacing_v)
        shape_v = np.maximum(np.ceil(axis_extent / spacing_v), 8).astype(int)
    elif shape is None:
        spacing_v = np.asarray(spacing, dtype=np.float64).reshape(3)
        shape_v = np.maximum(np.ceil(axis_extent / spacing_v), 1).astype(int)
    elif spacing is None:
        shape_v = np.asarray(shape, dtype=int).reshape(3)
        spacing_v = axis_extent / shape_v
    else:
        shape_v = np.asarray(shape, dtype=int).reshape(3)
        spacing_v = np.asarray(spacing, dtype=np.float64).reshape(3)
        covered = shape_v * spacing_v  # a grid smaller than the body: move it around inside
        if random_fov:
            slack = np.maximum(axis_extent - covered, 0) / 2
            shift = rng_fov.uniform(-1, 1, 3) * slack
            center_w = center_w + (direction @ shift)
    origin = center_w - direction @ (spacing_v * (shape_v - 1) / 2)
    return Volume(np.zeros(tuple(int(n) for n in shape_v), dtype=np.uint8), spacing_v, origin, direction)


# ----------------------------------------------------------------------------- public
def make_phantom(
    seed: int,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    random_orientation: bool = True,
    random_fov: bool = True,
    *,
    phase: str | None = None,
    noise: bool = True,
    max_oblique_degrees: float = 12.0,
    spacing_range: tuple[float, float] = (0.7, 5.0),
    max_voxels: int = 2_000_000,
    grid: Volume | None = None,
) -> Phantom:
    """Draw a synthetic abdominal CT with labels, deterministically from ``seed``.

    Args:
        seed: the anatomy, contrast, field of view, grid and noise all follow from it. The anatomy
            (in physical space) does not depend on the grid arguments.
        shape: voxels along ``i, j, k``. ``None``: derived from the field of view and spacing.
        spacing: mm along ``i, j, k``. ``None`` with ``shape``: chosen so the field of view fits;
            ``None`` without ``shape``: drawn log-uniformly per axis from ``spacing_range``.
        random_orientation: draw a random signed permutation of the voxel axes and, half of the
            time, an oblique rotation up to ``max_oblique_degrees``. ``False``: the axes of ``i, j,
            k`` point to patient left, posterior and superior (LPS identity direction).
        random_fov: draw the field of view (a random ``z`` range, margins, and the position of a grid
            smaller than the body). ``False``: the whole anatomy from below the femoral heads to
            above the diaphragm domes.
        phase: contrast phase (one of :data:`CONTRAST_PHASES`); ``None`` draws it.
        noise: add acquisition noise.
        max_oblique_degrees: largest oblique rotation of the grid.
        spacing_range: range of drawn spacings (mm).
        max_voxels: when shape and spacing are drawn, the spacing grows (up to the upper end of
            ``spacing_range``) until the grid has at most this many voxels.
        grid: render on this volume's grid instead (its array is ignored); overrides ``shape``,
            ``spacing`` and the orientation and field-of-view options.

    Returns:
        A :class:`Phantom` whose ``image`` is float32 HU and ``labels`` uint8, shape ``(I, J, K)``.
    """
    if shape is not None and (len(shape) != 3 or min(shape) < 1):
        raise ValueError(f"shape must be three positive integers, got {shape}")
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise ValueError(f"spacing must be three positive numbers, got {spacing}")
    if phase is not None and phase not in CONTRAST_PHASES:
        raise ValueError(f"phase must be one of {CONTRAST_PHASES}, got {phase!r}")
    if spacing_range[0] <= 0 or spacing_range[1] < spacing_range[0]:
        raise ValueError(f"spacing_range must be 0 < low <= high, got {spacing_range}")

    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(5)]
    rng_anatomy, rng_fov, rng_orient, rng_spacing, rng_texture = streams
    anatomy = _Anatomy(rng_anatomy)
    if phase is not None:
        anatomy.phase = phase
    if grid is None:
        grid = _sample_grid(rng_fov, rng_orient, rng_spacing, anatomy, shape, spacing, random_orientation,
                            random_fov, max_oblique_degrees, spacing_range, max_voxels)
    canvas = _Canvas(grid, anatomy.offset, anatomy.scale, anatomy.deformation)
    anatomy.paint(canvas, rng_texture)
    image = _render_intensities(canvas, anatomy, rng_texture, noise)

    name = f"phantom_{seed}"
    image_volume = Volume(image, grid.spacing.copy(), grid.origin.copy(), grid.direction.copy(), name=name)
    labels = Volume(canvas.labels, grid.spacing.copy(), grid.origin.copy(), grid.direction.copy(),
                    name=f"{name}_labels")
    centers = {k: anatomy.offset + np.asarray(v, dtype=np.float64) * anatomy.scale for k, v in anatomy.centers.items()}
    logger.debug("phantom %d: shape %s spacing %s phase %s", seed, grid.shape, np.round(grid.spacing, 2), anatomy.phase)
    return Phantom(image_volume, labels, phantom_label_table(), centers, anatomy.phase, int(seed))


def _render_intensities(c: _Canvas, anatomy: _Anatomy, rng: np.random.Generator, noise: bool) -> np.ndarray:
    phase_index = CONTRAST_PHASES.index(anatomy.phase)
    n = len(_T)
    base = np.zeros(n, dtype=np.float32)
    fine = np.zeros(n, dtype=np.float32)
    medium = np.zeros(n, dtype=np.float32)
    for tissue, (values, sd_fine, sd_medium) in _HU_TABLE.items():
        native = values[0]
        value = native + (values[phase_index] - native) * anatomy.enhancement
        jitter = 0.0 if tissue in (_T.AIR, _T.GAS) else anatomy.tissue_jitter[int(tissue)]
        base[int(tissue)] = value + jitter
        fine[int(tissue)] = sd_fine
        medium[int(tissue)] = sd_medium
    spacing = c.grid.spacing
    shape = c.grid.shape
    tissue = c.tissue
    # vessels inside liver and lungs: intersections of two noise zero-sets are tube-like
    va = _smooth_noise(shape, 5.0 / spacing, rng)
    vb = _smooth_noise(shape, 5.0 / spacing, rng)
    tubes = (np.abs(va) < 0.12) & (np.abs(vb) < 0.12)
    tissue = np.where(tubes & (tissue == _T.LIVER), np.uint8(_T.LIVER_VESSEL), tissue)
    tissue = np.where(tubes & (tissue == _T.LUNG), np.uint8(_T.LUNG_VESSEL), tissue)
    n_fine = _smooth_noise(shape, 1.0 / spacing, rng)
    n_medium = _smooth_noise(shape, 4.0 / spacing, rng)
    # gas bubbles in stool
    tissue = np.where((tissue == _T.FECES) & (n_fine > 1.1), np.uint8(_T.GAS), tissue)
    image = base[tissue] + fine[tissue] * n_fine + medium[tissue] * n_medium + c.hu_offset
    # dependent lung is denser
    lung = (tissue == _T.LUNG)
    image[lung] += 0.4 * np.clip(c.y[lung] - 10.0, 0, 120)
    del va, vb, tubes
    # point-spread function / partial volume
    image = ndimage.gaussian_filter(image, np.maximum(0.7 / spacing, 0.35), truncate=2.5)
    if noise:
        grain = rng.standard_normal(shape, dtype=np.float32)
        grain = ndimage.gaussian_filter(grain, np.maximum(0.6 / spacing, 0.3), truncate=2.5)
        grain *= np.float32(anatomy.noise_sd / (float(grain.std()) or 1.0))
        image += grain
    np.clip(image, -1024, 3071, out=image)
    return np.round(image).astype(np.float32)
