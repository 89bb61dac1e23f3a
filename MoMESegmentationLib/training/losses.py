"""Partial-label loss: per-prompt BCE + Dice on annotated prompts, plus router load balancing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["PartialLabelLoss", "LossTerms"]


@dataclass
class LossTerms:
    """The total loss and its parts (detached parts for logging)."""

    total: torch.Tensor
    bce: torch.Tensor
    dice: torch.Tensor
    balance: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), "bce": float(self.bce), "dice": float(self.dice),
                "balance": float(self.balance)}


class PartialLabelLoss(nn.Module):
    """Loss over prompts whose structure the sample's dataset annotates.

    * BCE on every weighted prompt (positives and negatives: an annotated but absent structure
      must predict nothing).
    * Soft Dice (MONAI ``DiceLoss`` with sigmoid, one value per prompt) on prompts whose target
      is not empty; Dice of an empty target is uninformative and would dominate small organs.
    * ``balance_weight`` times the router's load-balancing loss.

    Padding prompts (weight 0) and structures the dataset does not annotate never contribute.

    Args:
        bce_weight: weight of the BCE term.
        dice_weight: weight of the Dice term.
        balance_weight: weight of the router balancing term.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, balance_weight: float = 0.01) -> None:
        super().__init__()
        for name, value in (("bce_weight", bce_weight), ("dice_weight", dice_weight),
                            ("balance_weight", balance_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.balance_weight = balance_weight
        self.dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                balance_loss: torch.Tensor | None = None) -> LossTerms:
        """
        Args:
            logits: ``[B, K, D, H, W]``.
            target: ``[B, K, D, H, W]`` binary.
            weight: ``[B, K]``: 1 for an annotated prompt, 0 for padding.
            balance_loss: scalar router balancing loss, or ``None``.
        """
        if logits.shape != target.shape or weight.shape != logits.shape[:2]:
            raise ValueError(
                f"logits {tuple(logits.shape)}, target {tuple(target.shape)} and weight {tuple(weight.shape)} disagree"
            )
        logits = logits.float()
        target = target.float()
        weight = weight.float()
        denom = weight.sum().clamp_min(1.0)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(2, 3, 4))
        bce = (bce * weight).sum() / denom
        b, k = logits.shape[:2]
        dice = self.dice(logits.reshape(b * k, 1, *logits.shape[2:]), target.reshape(b * k, 1, *target.shape[2:]))
        dice = dice.reshape(b, k)
        positive = weight * (target.flatten(2).amax(dim=2) > 0).float()
        dice = (dice * positive).sum() / positive.sum().clamp_min(1.0)
        balance = balance_loss.float() if balance_loss is not None else logits.new_zeros(())
        total = self.bce_weight * bce + self.dice_weight * dice + self.balance_weight * balance
        return LossTerms(total, bce.detach(), dice.detach(), balance.detach())
