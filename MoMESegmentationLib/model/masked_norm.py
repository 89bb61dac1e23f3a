"""Normalisation and pooling over the valid voxels of a window only.

A scan shorter or narrower than one sliding window (a thin slab, a narrow field of view) reaches
the network padded to the window. SwinUNETR's convolution blocks use instance norm, the expert
projections and the global feature use group norm, and the global feature is an average over the
whole window: all of them then take their statistics over the padding as much as over the anatomy,
and every feature of the real voxels shifts. The layers here take a mask of the valid (unpadded)
voxels from :func:`valid_voxels` and compute their statistics over those voxels only; without a
mask (or with every voxel valid) they are exactly the PyTorch layers they replace, with the same
parameters and state-dict keys, so checkpoints load unchanged.

    >>> convert_norms(model)                      # once, after construction
    >>> with valid_voxels(mask):                  # mask [B, 1, D, H, W], True inside the scan
    ...     features = model.encode(image)

The mask is carried in a :class:`contextvars.ContextVar`, not on the modules, so concurrent
callers (threads) do not see each other's masks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MaskedAdaptiveAvgPool3d",
    "MaskedGroupNorm",
    "MaskedInstanceNorm3d",
    "convert_norms",
    "mask_like",
    "masked_group_norm",
    "valid_voxels",
]

_VALID: ContextVar[torch.Tensor | None] = ContextVar("mome_valid_voxels", default=None)


@contextmanager
def valid_voxels(mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block, masked layers normalise and pool over ``mask`` (``[B, 1, D, H, W]``) only.

    ``None``, or a mask that is true everywhere, leaves every layer unchanged (and costs nothing).
    """
    if mask is not None:
        if mask.ndim != 5 or mask.shape[1] != 1:
            raise ValueError(f"valid-voxel mask must be [B, 1, D, H, W], got {tuple(mask.shape)}")
        if bool(mask.all()):
            mask = None
    token = _VALID.set(None if mask is None else mask.bool())
    try:
        yield
    finally:
        _VALID.reset(token)


def mask_like(x: torch.Tensor) -> torch.Tensor | None:
    """The current valid-voxel mask at ``x``'s spatial size (``[B, 1, *x.shape[2:]]``), or ``None``.

    A coarse voxel is valid when any of the fine voxels it covers is.
    """
    mask = _VALID.get()
    if mask is None:
        return None
    size = tuple(x.shape[2:])
    if tuple(mask.shape[2:]) != size:
        if all(m >= s for m, s in zip(mask.shape[2:], size)):
            mask = F.adaptive_max_pool3d(mask.float(), size) > 0
        else:
            mask = F.interpolate(mask.float(), size=size, mode="nearest") > 0
    if mask.shape[0] != x.shape[0]:
        mask = mask.expand(x.shape[0], *mask.shape[1:])
    return mask


def masked_group_norm(
    x: torch.Tensor, groups: int, mask: torch.Tensor,
    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5,
) -> torch.Tensor:
    """Group norm of ``x`` (``[B, C, *S]``) with statistics over the voxels where ``mask`` (``[B, 1, *S]``) is true.

    Statistics are computed in float32; ``groups == C`` is instance norm.
    """
    b, c = x.shape[:2]
    flat = x.float().reshape(b, groups, c // groups, -1)
    m = mask.reshape(b, 1, 1, -1).float()
    count = (m.sum(dim=-1, keepdim=True) * (c // groups)).clamp_min(1.0)
    mean = (flat * m).sum(dim=(2, 3), keepdim=True) / count
    var = (((flat - mean) ** 2) * m).sum(dim=(2, 3), keepdim=True) / count
    out = ((flat - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    if weight is not None:
        shape = (1, c) + (1,) * (x.ndim - 2)
        out = out * weight.float().reshape(shape) + bias.float().reshape(shape)
    return out.to(x.dtype)


class MaskedInstanceNorm3d(nn.InstanceNorm3d):
    """:class:`torch.nn.InstanceNorm3d` whose statistics skip invalid voxels (see :func:`valid_voxels`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = mask_like(x)
        if mask is None or self.track_running_stats:
            return super().forward(x)
        return masked_group_norm(x, x.shape[1], mask, self.weight, self.bias, self.eps)


class MaskedGroupNorm(nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` whose statistics skip invalid voxels (see :func:`valid_voxels`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = mask_like(x)
        if mask is None:
            return super().forward(x)
        return masked_group_norm(x, self.num_groups, mask, self.weight, self.bias, self.eps)


class MaskedAdaptiveAvgPool3d(nn.AdaptiveAvgPool3d):
    """Global average pool (output size 1) over the valid voxels only (see :func:`valid_voxels`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = mask_like(x)
        if mask is None:
            return super().forward(x)
        m = mask.to(x.dtype)
        return (x * m).sum(dim=(2, 3, 4), keepdim=True) / m.sum(dim=(2, 3, 4), keepdim=True).clamp_min(1.0)


def _masked_copy(module: nn.Module) -> nn.Module | None:
    kind = type(module)
    if kind is nn.InstanceNorm3d:
        new = MaskedInstanceNorm3d(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
    elif kind is nn.GroupNorm:
        new = MaskedGroupNorm(module.num_groups, module.num_channels, module.eps, module.affine)
    elif kind is nn.AdaptiveAvgPool3d and module.output_size in (1, (1, 1, 1)):
        new = MaskedAdaptiveAvgPool3d(module.output_size)
    else:
        return None
    state = module.state_dict()
    new.load_state_dict(state)
    return new.to(next(iter(state.values())).device) if state else new


def convert_norms(module: nn.Module) -> nn.Module:
    """Replace, in place, every ``InstanceNorm3d``, ``GroupNorm`` and global ``AdaptiveAvgPool3d``
    below ``module`` by its masked twin; parameters and state-dict keys are kept. Returns ``module``."""
    for name, child in list(module.named_children()):
        replacement = _masked_copy(child)
        if replacement is not None:
            setattr(module, name, replacement)
        else:
            convert_norms(child)
    return module
