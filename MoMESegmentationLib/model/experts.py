"""Visual experts and the prompt-free image features that :meth:`MoME.encode` returns.

Each expert is one SwinUNETR decoder scale, projected to a common width by
``GroupNorm -> ReLU -> Conv3d(1x1x1)``. Expert features stay at their own resolution in
:class:`ImageFeatures` (they are upsampled only in :meth:`MoME.decode`), so that an inference
engine can cache them per sliding window at a fraction of the full-resolution size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ExpertProjection", "ImageFeatures", "group_count"]


def group_count(channels: int, max_groups: int) -> int:
    """Largest GroupNorm group count ``<= max_groups`` that divides ``channels``."""
    return math.gcd(channels, max_groups)


class ExpertProjection(nn.Sequential):
    """``GroupNorm -> ReLU -> Conv3d(1x1x1)``: one decoder scale to the common expert width.

    Submodule indices (``0`` norm, ``1`` ReLU, ``2`` conv) match the Universal Model's
    ``precls_conv``, so its weights load under ``experts.0.{0,2}.*``.

    Args:
        in_channels: decoder channels at this scale.
        out_channels: common expert width ``Ce``.
        norm_groups: maximum GroupNorm groups (reduced to a divisor of ``in_channels``).
    """

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 16) -> None:
        super().__init__(
            nn.GroupNorm(group_count(in_channels, norm_groups), in_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(in_channels, out_channels, kernel_size=1),
        )


@dataclass
class ImageFeatures:
    """Prompt-free features of a batch of image windows (the output of :meth:`MoME.encode`).

    Attributes:
        experts: one tensor per expert, ``[B, Ce, D / 2**s, H / 2**s, W / 2**s]`` at the expert's
            own decoder scale ``s`` (ordered as ``MoMEConfig.expert_scales``).
        global_feature: pooled bottleneck feature ``[B, global_dim]``.
        spatial_size: full-resolution ``(D, H, W)`` of the input window.
    """

    experts: list[torch.Tensor]
    global_feature: torch.Tensor
    spatial_size: tuple[int, int, int]

    def __post_init__(self) -> None:
        if not self.experts:
            raise ValueError("experts must hold at least one tensor")
        batch = self.global_feature.shape[0]
        for i, e in enumerate(self.experts):
            if e.ndim != 5 or e.shape[0] != batch:
                raise ValueError(f"experts[{i}] must be [B, C, D, H, W] with B={batch}, got {tuple(e.shape)}")
        self.spatial_size = tuple(int(s) for s in self.spatial_size)  # type: ignore[assignment]

    # -- properties -----------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Number of windows ``B``."""
        return int(self.global_feature.shape[0])

    @property
    def device(self) -> torch.device:
        return self.global_feature.device

    @property
    def dtype(self) -> torch.dtype:
        return self.experts[0].dtype

    @property
    def nbytes(self) -> int:
        """Memory held by all tensors, in bytes."""
        tensors = [*self.experts, self.global_feature]
        return sum(t.numel() * t.element_size() for t in tensors)

    def __len__(self) -> int:
        return self.batch_size

    # -- conversions ----------------------------------------------------------------------
    def _map(self, fn) -> ImageFeatures:
        return ImageFeatures([fn(e) for e in self.experts], fn(self.global_feature), self.spatial_size)

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        non_blocking: bool = False,
    ) -> ImageFeatures:
        """Move to ``device`` and/or cast floating tensors to ``dtype`` (e.g. float16 for a cache)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype, non_blocking=non_blocking))

    def cpu(self) -> ImageFeatures:
        return self.to("cpu")

    def detach(self) -> ImageFeatures:
        return self._map(lambda t: t.detach())

    # -- batching -------------------------------------------------------------------------
    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> ImageFeatures:
        """Select windows along the batch axis; an integer keeps a batch axis of size 1."""
        if isinstance(index, int):
            if not -self.batch_size <= index < self.batch_size:
                raise IndexError(f"window {index} out of range for batch of {self.batch_size}")
            index = slice(index, index + 1 if index != -1 else None)
        elif not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return self._map(lambda t: t[index])

    def split(self, size: int) -> list[ImageFeatures]:
        """Split into chunks of at most ``size`` windows."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        return [self[i : i + size] for i in range(0, self.batch_size, size)]

    @classmethod
    def cat(cls, items: Sequence[ImageFeatures]) -> ImageFeatures:
        """Concatenate along the batch axis (all items must come from the same model and window size)."""
        if not items:
            raise ValueError("cannot concatenate an empty list of ImageFeatures")
        first = items[0]
        for other in items[1:]:
            if other.spatial_size != first.spatial_size or len(other.experts) != len(first.experts):
                raise ValueError(
                    f"cannot concatenate features of window {other.spatial_size} with {len(other.experts)} "
                    f"experts onto window {first.spatial_size} with {len(first.experts)} experts"
                )
        experts = [torch.cat([f.experts[i] for f in items]) for i in range(len(first.experts))]
        return cls(experts, torch.cat([f.global_feature for f in items]), first.spatial_size)
