"""Scans shorter or narrower than one network window: how they are padded, and which voxels are real.

A thin slab (20 slices of the upper abdomen) or a narrow field of view is smaller than one sliding
window of the network. Padded with air (MONAI's default), the window shows a body that ends a few
centimetres above and below the slab, and instance norm, group norm and the pooled global feature
that conditions the heads take most of their statistics from that padding. Inference and training
therefore share one rule, written once here:

* **where the padding goes**: the deficit is split evenly before and after, along every axis
  shorter than the window (:func:`window_padding`);
* **what it holds** (``mode="mirror"``): a side where the field of view cuts through the body
  (:func:`truncated_sides`) continues the anatomy by reflection; a side where the body ends inside
  the scan gets air (0 after the HU window), as before; ``"constant"`` puts air everywhere;
* **which voxels are real**: a valid-voxel mask (false in the padding) lets the network's norms and
  global pool skip the padding (:mod:`MoMESegmentationLib.model.masked_norm`).

Arrays are ``[..., D, H, W]`` with the spatial axes last, in any axis order (the engine uses its
canonical RAS grid, training MONAI's RAS arrays); intensities are already windowed to [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "PAD_MODES",
    "TRUNCATION_FRACTION",
    "apply_padding",
    "pad_to_window",
    "truncated_sides",
    "valid_window_mask",
    "window_padding",
]

#: ``"mirror"``: reflect the anatomy where the field of view cuts the body, air elsewhere; ``"constant"``: air.
PAD_MODES = ("mirror", "constant")

#: A boundary slice is a cut through the body when the body's cross-section there is at least this
#: fraction of its largest cross-section along that axis (a table edge or an arm touching it is not).
TRUNCATION_FRACTION = 0.25

#: ``(amount, reflect)`` for the side before and the side after, per spatial axis.
PaddingPlan = tuple[tuple[tuple[int, bool], tuple[int, bool]], ...]


def truncated_sides(body: np.ndarray) -> tuple[tuple[bool, bool], ...]:
    """Per spatial axis of the mask ``body`` (``[D, H, W]``), whether the field of view cuts through
    the body at the first and at the last slice."""
    sides = []
    for axis in range(body.ndim):
        other = tuple(a for a in range(body.ndim) if a != axis)
        area = body.sum(axis=other)
        cut = max(1.0, TRUNCATION_FRACTION * float(area.max()))
        sides.append((bool(area[0] >= cut), bool(area[-1] >= cut)))
    return tuple(sides)


def window_padding(
    shape: Sequence[int], window: Sequence[int], truncated: Sequence[tuple[bool, bool]], mode: str = "mirror",
) -> PaddingPlan:
    """How to pad a spatial ``shape`` to at least ``window``: ``(amount, reflect)`` per side and axis."""
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
    if not len(shape) == len(window) == len(truncated):
        raise ValueError(f"shape {tuple(shape)}, window {tuple(window)} and truncated sides must have one "
                         "entry per spatial axis")
    plan = []
    for size, target, cut in zip(shape, window, truncated):
        deficit = max(0, int(target) - int(size))
        before, after = deficit // 2, deficit - deficit // 2
        reflect = mode == "mirror" and size > 1
        plan.append(((before, reflect and cut[0]), (after, reflect and cut[1])))
    return tuple(plan)


def apply_padding(array: np.ndarray, plan: PaddingPlan, fill: float = 0.0) -> np.ndarray:
    """Pad the last ``len(plan)`` axes of ``array`` as planned: reflection or ``fill``.

    Images and label maps padded with the same plan stay aligned; a valid-voxel mask is ones padded
    with ``fill=0`` (reflected anatomy is not real either). Reflected sides are padded first, so that
    a reflection wider than the image repeats the image rather than the fill of the other side.
    """
    lead = array.ndim - len(plan)
    for axis, sides in enumerate(plan, start=lead):
        for side in sorted(range(2), key=lambda s: not sides[s][1]):
            amount, reflect = sides[side]
            if amount == 0:
                continue
            widths = [(0, 0)] * array.ndim
            widths[axis] = (amount, 0) if side == 0 else (0, amount)
            if reflect:
                array = np.pad(array, widths, mode="reflect")
            else:
                array = np.pad(array, widths, mode="constant", constant_values=fill)
    return array


def pad_to_window(
    image: np.ndarray, window: Sequence[int], truncated: Sequence[tuple[bool, bool]], mode: str = "mirror",
) -> tuple[np.ndarray, tuple[tuple[int, int], ...]]:
    """Pad a windowed image (``[D, H, W]``) to at least one ``window``.

    Returns:
        The padded image and ``(before, after)`` voxels per axis (0 along axes already a window long).
    """
    plan = window_padding(image.shape, window, truncated, mode)
    return apply_padding(image, plan), tuple((b[0], a[0]) for b, a in plan)


def valid_window_mask(coords: Sequence, inside: Sequence[slice], device: torch.device | str = "cpu") -> torch.Tensor:
    """``[B, 1, D, H, W]`` mask of the voxels of each window that lie in the box ``inside``.

    Args:
        coords: one entry per window, MONAI ``sliding_window_inference`` coordinates
            (``[batch slice, channel slice, D slice, H slice, W slice]``).
        inside: index box of the real (unpadded) voxels in the padded image.
    """
    masks = []
    for c in coords:
        axes = [(torch.arange(w.start, w.stop) >= s.start) & (torch.arange(w.start, w.stop) < s.stop)
                for w, s in zip(c[-3:], inside)]
        masks.append(axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :])
    return torch.stack(masks)[:, None].to(device)
