"""Exact, invertible grid transforms: reorientation and resampling (numpy + torch only).

Everything here works on :class:`~.volume.Volume` grids (``array[i, j, k]``, LPS millimetres) and
needs nothing beyond numpy and torch, so the inference engine runs on a bare GPU machine.

Two transforms, each with a record that inverts it:

* :func:`canonicalize` / :func:`restore_from_canonical`: axis permutation and flips only, so the
  array axes run as close as possible to the requested anatomical directions (``"RAS"`` by default,
  as MONAI's ``Orientation("RAS")``). No interpolation: the round trip is bit-exact. An oblique
  grid keeps its residual rotation in the returned volume's ``direction``.
* :func:`resample_to_spacing` / :func:`resample_back`: linear or nearest-neighbour resampling with
  the **voxel-centre, extent-preserving convention** (``align_corners=False`` in torch): voxel
  ``n`` covers ``[n - 1/2, n + 1/2]`` in index units, and the resampled grid covers exactly the same
  physical box as the original. The new shape is ``round(shape * spacing / target)`` (at least 1) and
  the effective spacing is ``shape * spacing / new_shape``, so it can differ from the requested one
  by a fraction of a voxel over the whole field of view. :func:`resample_back` maps an array on the
  resampled grid back onto exactly the original shape.

:func:`resample_to_grid` is general physical-space resampling (any two grids, through their
affines), e.g. to put a label map on another volume's grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from .volume import Volume, nearest_axes

__all__ = [
    "CanonicalRecord",
    "ResampleRecord",
    "canonicalize",
    "orientation_codes",
    "resample_back",
    "resample_to_grid",
    "resample_to_spacing",
    "restore_from_canonical",
]

ArrayLike = Union[np.ndarray, torch.Tensor]  # noqa: UP007 - a runtime alias, Python 3.10 compatible

# Anatomical letter -> (LPS physical axis, sign of that axis in LPS).
_AXIS_OF_LETTER = {
    "L": (0, 1.0),
    "R": (0, -1.0),
    "P": (1, 1.0),
    "A": (1, -1.0),
    "S": (2, 1.0),
    "I": (2, -1.0),
}
_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))  # negative, positive direction of each LPS axis

_MODES = ("linear", "nearest")


# --------------------------------------------------------------------------------------------
# Reorientation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CanonicalRecord:
    """How :func:`canonicalize` reordered an array, enough to undo it exactly.

    Attributes:
        permutation: ``canonical = original.transpose(permutation)`` (before the flips).
        flips: for each canonical axis, whether it was reversed after the permutation.
        original_shape: spatial shape ``(I, J, K)`` of the original array.
    """

    permutation: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    original_shape: tuple[int, int, int]

    @property
    def is_identity(self) -> bool:
        return self.permutation == (0, 1, 2) and not any(self.flips)


def _parse_axcodes(axcodes: str) -> list[tuple[int, float]]:
    codes = axcodes.upper()
    if len(codes) != 3 or any(c not in _AXIS_OF_LETTER for c in codes):
        raise ValueError(f"axcodes must be three letters from L/R, P/A, S/I, got {axcodes!r}")
    parsed = [_AXIS_OF_LETTER[c] for c in codes]
    if sorted(axis for axis, _ in parsed) != [0, 1, 2]:
        raise ValueError(f"axcodes must name each anatomical axis once, got {axcodes!r}")
    return parsed


def orientation_codes(volume: Volume) -> str:
    """The anatomical direction each array axis runs closest to, e.g. ``"LPS"`` or ``"RAS"``."""
    physical_of, signs = nearest_axes(volume.direction)
    return "".join(_LETTERS[p][1 if s > 0 else 0] for p, s in zip(physical_of, signs))


def canonicalize(volume: Volume, axcodes: str = "RAS") -> tuple[Volume, CanonicalRecord]:
    """Permute and flip the array axes so they run as close as possible to ``axcodes``.

    Args:
        volume: any grid; ``array`` has shape ``(I, J, K)``.
        axcodes: target direction of the increasing index along each array axis, e.g. ``"RAS"``
            (the default, as MONAI's ``Orientation("RAS")``) or ``"LPS"``.

    Returns:
        ``(canonical, record)``: ``canonical.array`` has shape ``(D, H, W)``, a permutation of
        ``(I, J, K)`` (a C-contiguous copy); its spacing, origin and direction describe the same
        voxels at the same physical positions. ``record`` undoes it with
        :func:`restore_from_canonical`.
    """
    target = _parse_axcodes(axcodes)
    physical_of, signs = nearest_axes(volume.direction)
    permutation = tuple(physical_of.index(axis) for axis, _ in target)
    flips = tuple(bool(signs[permutation[t]] != sign) for t, (_, sign) in enumerate(target))
    record = CanonicalRecord(permutation=permutation, flips=flips, original_shape=volume.shape)  # type: ignore

    shape = volume.shape
    # Index (in the original grid) of the canonical voxel (0, 0, 0).
    first = np.zeros(3)
    for t, a in enumerate(permutation):
        if flips[t]:
            first[a] = shape[a] - 1
    direction = np.stack(
        [volume.direction[:, a] * (-1.0 if flips[t] else 1.0) for t, a in enumerate(permutation)], axis=1
    )
    canonical = Volume(
        array=_apply_canonical(volume.array, record),
        spacing=volume.spacing[list(permutation)],
        origin=volume.index_to_physical(first),
        direction=direction,
        name=volume.name,
    )
    return canonical, record


def _apply_canonical(array: np.ndarray, record: CanonicalRecord) -> np.ndarray:
    if record.is_identity:
        return np.ascontiguousarray(array)
    out = np.transpose(array, record.permutation)
    flip_axes = tuple(t for t, f in enumerate(record.flips) if f)
    if flip_axes:
        out = np.flip(out, axis=flip_axes)
    return np.ascontiguousarray(out)


def restore_from_canonical(array: ArrayLike, record: CanonicalRecord) -> ArrayLike:
    """Undo :func:`canonicalize` on an array in canonical voxel order.

    Args:
        array: numpy array or torch tensor of shape ``(..., D, H, W)``; any number of leading
            (e.g. channel) dimensions, the last three in canonical order.
        record: what :func:`canonicalize` returned.

    Returns:
        The same type (and device) with shape ``(..., I, J, K)`` in the original voxel order;
        values are moved, never interpolated.
    """
    if array.ndim < 3:
        raise ValueError(
            f"array must have at least 3 dimensions (..., D, H, W), got shape {tuple(array.shape)}"
        )
    lead = array.ndim - 3
    expected = tuple(record.original_shape[a] for a in record.permutation)
    if tuple(array.shape[-3:]) != expected:
        raise ValueError(
            f"spatial shape {tuple(array.shape[-3:])} does not match the canonical grid {expected}"
        )
    if record.is_identity:
        return array
    flip_axes = tuple(lead + t for t, f in enumerate(record.flips) if f)
    inverse = np.argsort(record.permutation)
    order = tuple(range(lead)) + tuple(lead + int(a) for a in inverse)
    if isinstance(array, torch.Tensor):
        out = torch.flip(array, dims=flip_axes) if flip_axes else array
        return out.permute(order).contiguous()
    out = np.flip(array, axis=flip_axes) if flip_axes else array
    return np.ascontiguousarray(np.transpose(out, order))


# --------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResampleRecord:
    """The two grids of :func:`resample_to_spacing`, enough for :func:`resample_back`.

    Attributes:
        original_shape / original_spacing: the grid before resampling.
        shape / spacing: the resampled grid (``spacing`` is the effective spacing).
    """

    original_shape: tuple[int, int, int]
    original_spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def is_identity(self) -> bool:
        return self.shape == self.original_shape


def _check_mode(mode: str) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    return mode


def _to_5d_float(array: ArrayLike, mode: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A ``(1, C, D, H, W)`` floating tensor and the leading shape that was folded into ``C``."""
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    lead = tuple(tensor.shape[:-3])
    tensor = tensor.reshape((1, -1) + tuple(tensor.shape[-3:]))
    if tensor.dtype == torch.float64:
        return tensor, lead
    if tensor.is_floating_point() and tensor.dtype != torch.float32 and tensor.device.type != "cpu":
        return tensor, lead  # half precision stays half on an accelerator
    if not tensor.is_floating_point() and mode == "nearest" and tensor.dtype in (torch.int32, torch.int64):
        return tensor.to(torch.float64), lead  # label values above 2**24 stay exact
    return tensor.to(torch.float32), lead


def _from_5d(tensor: torch.Tensor, lead: tuple[int, ...], like: ArrayLike, mode: str) -> ArrayLike:
    """Unfold ``C`` back into the leading shape; nearest keeps the input dtype, linear keeps floats."""
    out = tensor.reshape(lead + tuple(tensor.shape[-3:]))
    if isinstance(like, torch.Tensor):
        if mode == "nearest" or like.is_floating_point():
            out = out.to(like.dtype)
        return out
    result = out.cpu().numpy()
    if mode == "nearest" or np.issubdtype(like.dtype, np.floating):
        result = result.astype(like.dtype, copy=False)
    return result


def _interpolate(array: ArrayLike, shape: tuple[int, int, int], mode: str) -> ArrayLike:
    """Resize the last three axes to ``shape`` (voxel-centre convention, ``align_corners=False``)."""
    if tuple(array.shape[-3:]) == tuple(shape):
        return array
    tensor, lead = _to_5d_float(array, mode)
    if mode == "linear":
        out = F.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)
    else:
        # "nearest-exact" samples voxel centres symmetrically; plain "nearest" is off by half a voxel.
        out = F.interpolate(tensor, size=shape, mode="nearest-exact")
    return _from_5d(out, lead, array, mode)


def resample_to_spacing(
    volume: Volume, spacing: float | tuple[float, float, float] | np.ndarray, mode: str = "linear"
) -> tuple[Volume, ResampleRecord]:
    """Resample to (about) ``spacing`` mm over exactly the same physical box.

    Args:
        volume: the grid to resample; ``array`` shape ``(I, J, K)``.
        spacing: target voxel size in mm, one value or one per axis.
        mode: ``"linear"`` (trilinear; integer input becomes float32) or ``"nearest"`` (keeps dtype;
            for label maps).

    Returns:
        ``(resampled, record)``: see the module docstring for the grid convention; the direction is
        unchanged and the origin moves so both grids share their outer voxel corners.
    """
    _check_mode(mode)
    target = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    if np.any(target <= 0) or not np.all(np.isfinite(target)):
        raise ValueError(f"spacing must be positive and finite, got {spacing}")
    old_shape = np.asarray(volume.shape, dtype=np.float64)
    extent = old_shape * volume.spacing
    new_shape = tuple(int(max(1, round(float(n)))) for n in extent / target)
    new_spacing = extent / np.asarray(new_shape, dtype=np.float64)
    record = ResampleRecord(
        original_shape=volume.shape,
        original_spacing=tuple(float(s) for s in volume.spacing),  # type: ignore[arg-type]
        shape=new_shape,  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in new_spacing),  # type: ignore[arg-type]
    )
    if record.is_identity:
        return Volume(
            volume.array, volume.spacing.copy(), volume.origin.copy(), volume.direction.copy(), volume.name
        ), record
    # Centre of new voxel 0 in old continuous indices: the shared corner is at index -1/2.
    first = (new_spacing / volume.spacing - 1.0) / 2.0
    resampled = Volume(
        array=_interpolate(volume.array, new_shape, mode),
        spacing=new_spacing,
        origin=volume.index_to_physical(first),
        direction=volume.direction.copy(),
        name=volume.name,
    )
    return resampled, record


def resample_back(array: ArrayLike, record: ResampleRecord, mode: str = "linear") -> ArrayLike:
    """Map an array on the resampled grid back onto exactly the original grid.

    Args:
        array: numpy array or torch tensor, shape ``(..., D', H', W')`` = ``(..., *record.shape)``;
            leading (channel) dimensions are resampled independently.
        record: from :func:`resample_to_spacing`.
        mode: ``"linear"`` (probabilities, logits) or ``"nearest"`` (labels; keeps dtype).

    Returns:
        The same type (and device) with shape ``(..., *record.original_shape)``.
    """
    _check_mode(mode)
    if array.ndim < 3:
        raise ValueError(
            f"array must have at least 3 dimensions (..., D, H, W), got shape {tuple(array.shape)}"
        )
    if tuple(array.shape[-3:]) != tuple(record.shape):
        raise ValueError(
            f"spatial shape {tuple(array.shape[-3:])} does not match the resampled grid {record.shape}"
        )
    return _interpolate(array, record.original_shape, mode)


def resample_to_grid(
    volume: Volume,
    reference: Volume,
    mode: str = "linear",
    fill_value: float = 0.0,
    chunk_voxels: int = 2**22,
) -> Volume:
    """Resample ``volume`` onto ``reference``'s grid through both index-to-LPS affines.

    Every reference voxel centre is mapped to a continuous index of ``volume`` and sampled with
    ``torch.nn.functional.grid_sample`` (``align_corners=False``, so index ``n`` is the centre of
    voxel ``n``). Points outside ``volume``'s voxels (beyond half a voxel from the outer centres)
    get ``fill_value``. Work is done in slabs of about ``chunk_voxels`` output voxels.

    Args:
        volume: source voxels, ``array`` shape ``(I, J, K)``.
        reference: target grid (its array only supplies the shape).
        mode: ``"linear"`` or ``"nearest"`` (nearest keeps the dtype; use it for label maps).

    Returns:
        A :class:`Volume` on ``reference``'s grid.
    """
    _check_mode(mode)
    source, _ = _to_5d_float(volume.array, mode)
    if source.dtype not in (torch.float32, torch.float64):
        source = source.to(torch.float32)
    in_shape = np.asarray(volume.shape, dtype=np.float64)
    # reference index -> source continuous index
    transform = np.linalg.inv(volume.affine_lps) @ reference.affine_lps
    out_shape = reference.shape
    out = torch.empty((out_shape[0], out_shape[1], out_shape[2]), dtype=source.dtype)
    slab = max(1, chunk_voxels // max(1, out_shape[1] * out_shape[2]))
    jj, kk = np.meshgrid(np.arange(out_shape[1]), np.arange(out_shape[2]), indexing="ij")
    for start in range(0, out_shape[0], slab):
        stop = min(out_shape[0], start + slab)
        ii = np.arange(start, stop, dtype=np.float64)[:, None, None]
        index = np.stack(
            np.broadcast_arrays(ii, jj[None].astype(np.float64), kk[None].astype(np.float64)), axis=-1
        )
        src = index @ transform[:3, :3].T + transform[:3, 3]
        inside = np.all((src >= -0.5) & (src <= in_shape - 0.5), axis=-1)
        # grid_sample wants (x, y, z) = (W, H, D) = (K, J, I), normalised to [-1, 1] over voxel edges.
        normalised = (2.0 * src + 1.0) / in_shape - 1.0
        grid = torch.as_tensor(normalised[..., ::-1].copy(), dtype=source.dtype)[None]
        sampled = F.grid_sample(
            source,
            grid,
            mode="bilinear" if mode == "linear" else "nearest",
            padding_mode="border",
            align_corners=False,
        )[0, 0]
        sampled[~torch.as_tensor(inside)] = fill_value
        out[start:stop] = sampled
    result = out.numpy()
    if mode == "nearest" or np.issubdtype(volume.array.dtype, np.floating):
        result = result.astype(volume.array.dtype, copy=False)
    return Volume(
        result, reference.spacing.copy(), reference.origin.copy(), reference.direction.copy(), volume.name
    )
