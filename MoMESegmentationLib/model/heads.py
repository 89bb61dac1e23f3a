"""Prompt-specific dynamic segmentation heads (CLIP-Driven Universal Model style).

A controller maps ``[global image feature; projected prompt]`` to the parameters of a small
per-prompt network of 1x1x1 convolutions (``C -> C -> ... -> 1`` with ReLU between layers),
which is applied to that prompt's fused expert features. With the default ``C = 8`` and three
layers that is ``8*8 + 8*8 + 8*1`` weights and ``8 + 8 + 1`` biases = 153 parameters per prompt,
laid out as in the Universal Model (all weights first, then all biases; each weight block is
``[out, in]`` row-major).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DynamicHead", "dynamic_param_counts"]


def dynamic_param_counts(channels: int, layers: int) -> tuple[list[int], list[int]]:
    """``(weight_nums, bias_nums)`` of a dynamic head with ``layers`` layers of width ``channels``."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    weight_nums = [channels * channels] * (layers - 1) + [channels]
    bias_nums = [channels] * (layers - 1) + [1]
    return weight_nums, bias_nums


class DynamicHead(nn.Module):
    """Controller plus batched dynamic convolutions: one logit map per prompt.

    Args:
        condition_channels: width of ``[global feature; projected prompt]``.
        channels: head width ``C`` (input features must have ``C`` channels).
        layers: number of dynamic 1x1x1 convolutions.
    """

    def __init__(self, condition_channels: int, channels: int = 8, layers: int = 3) -> None:
        super().__init__()
        self.channels = channels
        self.weight_nums, self.bias_nums = dynamic_param_counts(channels, layers)
        self.num_params = sum(self.weight_nums) + sum(self.bias_nums)
        # A 1x1x1 convolution (not a Linear) so Universal Model weights load unchanged.
        self.controller = nn.Conv3d(condition_channels, self.num_params, kernel_size=1)

    def parameters_for(self, condition: torch.Tensor) -> torch.Tensor:
        """Dynamic parameters ``[B, K, num_params]`` from conditions ``[B, K, condition_channels]``."""
        b, k, c = condition.shape
        params = self.controller(condition.reshape(b * k, c, 1, 1, 1))
        return params.reshape(b, k, self.num_params)

    def split_parameters(self, params: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Split ``[B, K, num_params]`` into per-layer weights ``[B, K, out, in]``, biases ``[B, K, out]``."""
        b, k, _ = params.shape
        chunks = torch.split(params, self.weight_nums + self.bias_nums, dim=-1)
        n = len(self.weight_nums)
        weights = [w.reshape(b, k, -1, self.channels) for w in chunks[:n]]
        biases = list(chunks[n:])
        return weights, biases

    def forward(self, features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Apply each prompt's head to its features.

        Args:
            features: fused features ``[B, K, C, D, H, W]``.
            params: dynamic parameters ``[B, K, num_params]``.

        Returns:
            Logits ``[B, K, D, H, W]``.
        """
        b, k, c, *spatial = features.shape
        if c != self.channels:
            raise ValueError(f"features must have {self.channels} channels, got {c}")
        weights, biases = self.split_parameters(params.to(features.dtype))
        x = features.reshape(b, k, c, -1)
        for i, (w, bias) in enumerate(zip(weights, biases, strict=True)):
            x = torch.matmul(w, x).add_(bias.unsqueeze(-1))  # [B, K, out, N]
            if i < len(weights) - 1:
                x = x.relu_()
        return x.reshape(b, k, *spatial)
