"""Text-guided router: per-prompt, per-voxel gates over the visual experts.

For prompt ``k`` and voxel ``v`` the router is a two-layer MLP over the concatenation of the
experts' features at ``v`` and the projected prompt embedding ``t_k``::

    hidden_k(v) = ReLU( sum_e A_e x_e(v) + A_t t_k + b )          (router_hidden channels)
    logits_k(v) = W hidden_k(v) + c                                (E experts)
    gates_k(v)  = softmax(logits_k(v))  [optionally top-k, renormalised]

The first layer is linear in each expert, so ``A_e x_e`` is computed at the expert's own
resolution and resized to the routing grid (a 1x1x1 convolution commutes with linear
interpolation). Logits are computed at ``2**router_scale`` lower resolution and upsampled
trilinearly to full resolution before the softmax, so gates are defined for every voxel.

The auxiliary load-balancing loss follows the Switch Transformer (Fedus et al., 2021):
``E * sum_e f_e * P_e`` with ``f_e`` the fraction of (voxel, prompt) assignments dispatched to
expert ``e`` (its top-k membership, top-1 without top-k) and ``P_e`` the mean gate probability.
It equals 1 when usage is uniform and grows up to ``E`` as routing collapses onto one expert.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RouterOutput", "TextGuidedRouter", "top_k_gates", "switch_balance_loss", "resize"]


@dataclass
class RouterOutput:
    """Auxiliary routing outputs of :meth:`MoME.decode` (``return_aux=True``).

    Attributes:
        weights: gates ``[B, K, E, D, H, W]`` (sum to 1 over ``E`` at every voxel), or ``None``.
        usage: mean gate per prompt and expert ``[B, K, E]``.
        balance_loss: scalar load-balancing loss (1 at uniform usage, up to ``E`` when collapsed).
    """

    weights: torch.Tensor | None
    usage: torch.Tensor
    balance_loss: torch.Tensor


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize ``[N, C, *spatial]`` to ``size``: trilinear when enlarging, area average when shrinking."""
    size = tuple(int(s) for s in size)
    current = tuple(x.shape[2:])
    if current == size:
        return x
    if all(s >= c for s, c in zip(size, current, strict=True)):
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    if all(s <= c for s, c in zip(size, current, strict=True)):
        return F.adaptive_avg_pool3d(x, size)
    raise ValueError(f"cannot resize {current} to {size}: mixed up- and down-sampling")


def top_k_gates(
    logits: torch.Tensor, k: int | None, dim: int = 2, with_dispatch: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Softmax gates with optional top-k sparsity.

    Args:
        logits: gate logits with experts along ``dim``.
        k: keep the ``k`` largest gates and renormalise them (others exactly 0); ``None`` keeps all.
        dim: expert axis.
        with_dispatch: also return the dispatch mask (needed for the balancing loss).

    Returns:
        ``(gates, probs, dispatch)``: final gates, dense softmax probabilities, and the 0/1
        dispatch mask of the top-``k`` experts (top-1 when ``k`` is ``None``; ``None`` when not
        requested and not needed), all shaped like ``logits``.
    """
    probs = torch.softmax(logits, dim=dim, dtype=torch.float32).to(logits.dtype)
    num_experts = logits.shape[dim]
    sparse = k is not None and k < num_experts
    if not (sparse or with_dispatch):
        return probs, probs, None
    keep = 1 if k is None else min(k, num_experts)
    index = probs.topk(keep, dim=dim).indices
    dispatch = torch.zeros_like(probs).scatter_(dim, index, 1.0)
    if not sparse:
        return probs, probs, dispatch
    kept = probs * dispatch
    gates = kept / kept.sum(dim=dim, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)
    return gates, probs, dispatch


def switch_balance_loss(probs: torch.Tensor, dispatch: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e``.

    Args:
        probs: dense gate probabilities, experts along ``dim`` (e.g. ``[B, K, E, D, H, W]``).
        dispatch: 0/1 mask of the experts each position is dispatched to (same shape).
        dim: expert axis.

    Returns:
        Scalar: 1 when usage is uniform, ``E`` when every position uses the same expert.
    """
    num_experts = probs.shape[dim]
    reduce = [d for d in range(probs.ndim) if d != dim % probs.ndim]
    f = dispatch.float().mean(dim=reduce)
    f = f / f.sum().clamp_min(torch.finfo(f.dtype).tiny)
    p = probs.float().mean(dim=reduce)
    return num_experts * (f * p).sum()


class TextGuidedRouter(nn.Module):
    """Per-voxel, per-prompt gating over ``E`` experts, conditioned on the prompt.

    With a single expert the router has no parameters and every gate is exactly 1.

    Args:
        num_experts: number of experts ``E``.
        expert_channels: channels of each expert feature ``Ce``.
        text_channels: width of the projected prompt embedding.
        hidden: hidden width of the routing MLP.
        top_k: keep the ``top_k`` largest gates per voxel (``None``: dense softmax).
    """

    def __init__(
        self,
        num_experts: int,
        expert_channels: int,
        text_channels: int,
        hidden: int = 32,
        top_k: int | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts} or None, got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden = hidden
        if num_experts > 1:
            # A_e: per-expert voxel descriptors (the bias b lives in text_proj).
            self.expert_proj = nn.ModuleList(
                nn.Conv3d(expert_channels, hidden, kernel_size=1, bias=False) for _ in range(num_experts)
            )
            self.text_proj = nn.Linear(text_channels, hidden)  # A_t, b
            self.gate = nn.Linear(hidden, num_experts)  # W, c

    def descriptors(self, experts: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor | None:
        """Prompt-independent first-layer term ``sum_e A_e x_e`` on the routing grid.

        Args:
            experts: expert features ``[B, Ce, D_s, H_s, W_s]`` at their own scales.
            size: routing grid ``(Dr, Hr, Wr)``.

        Returns:
            ``[B, hidden, Dr, Hr, Wr]``, or ``None`` for a single expert.
        """
        if self.num_experts == 1:
            return None
        if len(experts) != self.num_experts:
            raise ValueError(f"expected {self.num_experts} expert features, got {len(experts)}")
        total = None
        for proj, x in zip(self.expert_proj, experts, strict=True):
            # Linear projection and resizing commute: apply the projection on the smaller grid.
            larger = math.prod(x.shape[2:]) > math.prod(size)
            term = proj(resize(x, size)) if larger else resize(proj(x), size)
            total = term if total is None else total + term
        return total

    def logits(self, descriptors: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Gate logits for ``K`` prompts.

        Args:
            descriptors: ``[B, hidden, Dr, Hr, Wr]`` from :meth:`descriptors`.
            text: projected prompt embeddings ``[B, K, text_channels]``.

        Returns:
            ``[B, K, E, Dr, Hr, Wr]``.
        """
        b, k = text.shape[:2]
        spatial = descriptors.shape[2:]
        t = self.text_proj(text)  # [B, K, hidden]
        flat = descriptors.flatten(2).unsqueeze(1)  # [B, 1, hidden, N]
        hidden = (flat + t.unsqueeze(-1)).relu_()  # [B, K, hidden, N]
        out = torch.matmul(self.gate.weight, hidden).add_(self.gate.bias.unsqueeze(-1))  # [B, K, E, N]
        return out.reshape(b, k, self.num_experts, *spatial)

    def forward(
        self,
        descriptors: torch.Tensor | None,
        text: torch.Tensor,
        size: Sequence[int],
        with_dispatch: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Gates at full resolution for ``K`` prompts.

        Args:
            descriptors: output of :meth:`descriptors` (``None`` for a single expert).
            text: projected prompt embeddings ``[B, K, text_channels]``.
            size: full-resolution ``(D, H, W)``.
            with_dispatch: also return the dispatch mask for the balancing loss.

        Returns:
            ``(gates, probs, dispatch)`` each ``[B, K, E, D, H, W]`` (see :func:`top_k_gates`).
        """
        batch, prompts = text.shape[:2]
        if self.num_experts == 1:
            ones = text.new_ones((batch, prompts, 1, *size))
            return ones, ones, ones
        logits = self.logits(descriptors, text)
        if tuple(logits.shape[3:]) != tuple(size):
            flat = logits.reshape(batch * prompts, self.num_experts, *logits.shape[3:])
            logits = resize(flat, size).reshape(batch, prompts, self.num_experts, *size)
        return top_k_gates(logits, self.top_k, dim=2, with_dispatch=with_dispatch)
