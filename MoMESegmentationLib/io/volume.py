"""The in-memory volume: voxels plus the exact geometry of their grid.

Convention, stated once for the whole library:

* ``array[i, j, k]`` is the voxel with index ``(i, j, k)`` (ITK/Slicer IJK order; ``i`` varies
  fastest on disk). This is nibabel's and MONAI's spatial axis order and the transpose of
  ``SimpleITK.GetArrayFromImage``.
* Physical coordinates are **LPS** millimetres (ITK, DICOM): ``x`` grows to the patient's left,
  ``y`` to posterior, ``z`` to superior.
* ``direction`` is a 3x3 matrix whose **columns** are the LPS unit vectors of the ``i``, ``j``,
  ``k`` axes, so ``point = origin + direction @ (spacing * index)``.

RAS (NIfTI, Slicer) differs by the sign of the first two physical axes; use
:attr:`Volume.affine_ras` and :meth:`Volume.from_affine` to convert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Volume", "LPS_TO_RAS", "nearest_axes"]

#: Multiply an LPS point (or the left side of an LPS affine) by this to get RAS, and vice versa.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Volume:
    """A 3D array on a physical grid (see the module docstring for the convention).

    Args:
        array: voxel values, shape ``(I, J, K)``.
        spacing: voxel size along ``i, j, k`` in mm, shape ``(3,)``.
        origin: LPS position of voxel ``(0, 0, 0)``'s centre in mm, shape ``(3,)``.
        direction: 3x3 matrix, columns are the LPS directions of the ``i, j, k`` axes.
        name: where the volume came from (a file name), used in messages.
    """

    array: np.ndarray
    spacing: np.ndarray = field(default_factory=lambda: np.ones(3))
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    name: str = ""

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.spacing = np.asarray(self.spacing, dtype=np.float64).reshape(3)
        self.origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if self.array.ndim != 3:
            raise ValueError(f"array must be 3D (I, J, K), got shape {self.array.shape}")
        if np.any(self.spacing <= 0) or not np.all(np.isfinite(self.spacing)):
            raise ValueError(f"spacing must be positive and finite, got {self.spacing}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous ``(i, j, k, 1)`` to LPS millimetres."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction * self.spacing[None, :]
        affine[:3, 3] = self.origin
        return affine

    @property
    def affine_ras(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous ``(i, j, k, 1)`` to RAS millimetres (NIfTI, Slicer IJK-to-RAS)."""
        affine = self.affine_lps
        affine[:3, :] = LPS_TO_RAS @ affine[:3, :]
        return affine

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.spacing)) / 1000.0

    @classmethod
    def from_affine(cls, array: np.ndarray, affine: np.ndarray, convention: str = "LPS", name: str = "") -> Volume:
        """Build a volume from a 4x4 index-to-physical matrix in ``"LPS"`` or ``"RAS"``."""
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {affine.shape}")
        if convention.upper() == "RAS":
            affine = affine.copy()
            affine[:3, :] = LPS_TO_RAS @ affine[:3, :]
        elif convention.upper() != "LPS":
            raise ValueError(f"convention must be 'LPS' or 'RAS', got {convention!r}")
        linear = affine[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        if np.any(spacing <= 0):
            raise ValueError(f"affine has a zero-length axis: {affine.tolist()}")
        return cls(array, spacing=spacing, origin=affine[:3, 3], direction=linear / spacing[None, :], name=name)

    def with_array(self, array: np.ndarray, name: str | None = None) -> Volume:
        """A volume with new voxels on this volume's grid (shape must match)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array, self.spacing.copy(), self.origin.copy(), self.direction.copy(),
                      self.name if name is None else name)

    def index_to_physical(self, index: np.ndarray) -> np.ndarray:
        """LPS millimetres of continuous indices, shape ``(..., 3)``."""
        index = np.asarray(index, dtype=np.float64)
        return index @ (self.direction * self.spacing[None, :]).T + self.origin

    def physical_to_index(self, point: np.ndarray) -> np.ndarray:
        """Continuous indices of LPS points, shape ``(..., 3)``."""
        point = np.asarray(point, dtype=np.float64)
        inverse = np.linalg.inv(self.direction * self.spacing[None, :])
        return (point - self.origin) @ inverse.T

    def same_grid(self, other: Volume, atol: float = 1e-6) -> bool:
        """True when both volumes have the same shape, spacing, origin and direction."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )


def nearest_axes(direction: np.ndarray) -> tuple[list[int], list[float]]:
    """For each array axis, the LPS axis it runs closest to and the sign along it.

    The closest orthogonal matrix (polar decomposition) removes any shear, then the largest
    remaining entries are assigned greedily, each physical axis used once (as nibabel's
    ``io_orientation``).
    """
    direction = np.asarray(direction, dtype=np.float64)
    u, _, vt = np.linalg.svd(direction)
    rotation = np.abs(u @ vt)
    physical_of = [-1, -1, -1]
    for _ in range(3):
        p, a = np.unravel_index(int(np.argmax(rotation)), rotation.shape)
        physical_of[a] = int(p)
        rotation[p, :] = -1.0
        rotation[:, a] = -1.0
    signs = [1.0 if direction[physical_of[a], a] >= 0 else -1.0 for a in range(3)]
    return physical_of, signs
