"""Start a MoME backbone from MONAI's published Swin UNETR weights (``mome train --init-backbone``).

Two public files (Apache-2.0, Tang et al., CVPR 2022; self-supervised on 5,050 CT scans):

* ``model_swinvit.pt`` -- the Swin ViT encoder alone, ``{"state_dict": {...}}`` with names
  ``module.patch_embed.*``, ``module.layers1.0.blocks.0.*``, ... and the MLP as
  ``mlp.fc1``/``mlp.fc2`` (MONAI's ``SwinUNETR.load_from`` reads these names);
* ``swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt`` -- a whole Swin UNETR-Base (feature size 48)
  state dict with MONAI module names (``swinViT.*``, ``encoder1.*``, ..., ``decoder1.*``,
  ``out.*``), under ``"state_dict"``; the Universal Model starts from it.

:func:`load_backbone_weights` maps either layout onto ``model.backbone`` and reports which
tensors were loaded, which backbone tensors kept their initialisation and which file tensors were
not used. Both files predate MONAI 1.5; the backbone switches to the patch merging they were
trained with (:mod:`~MoMESegmentationLib.model.legacy_merging`) whenever the model's config can
record that choice.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..model.legacy_merging import legacy_config_supported, patch_merging_mode, use_legacy_patch_merging
from .safe_load import find_state_dict, load_weights_only, sha256_file, strip_prefix

__all__ = ["BackboneLoadReport", "map_monai_key", "load_backbone_weights"]

logger = logging.getLogger(__name__)

#: Top-level blocks of MONAI's SwinUNETR that a backbone may hold.
_SWINUNETR_BLOCKS = (
    "swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.",
    "decoder5.", "decoder4.", "decoder3.", "decoder2.", "decoder1.", "out.",
)  # fmt: skip
#: First name parts of a bare Swin ViT (no "swinViT." in front).
_SWINVIT_PARTS = (
    "patch_embed.",
    "layers1.",
    "layers2.",
    "layers3.",
    "layers4.",
    "layers1c.",
    "layers2c.",
    "layers3c.",
    "layers4c.",
    "pos_drop.",
)


@dataclass
class BackboneLoadReport:
    """Result of :func:`load_backbone_weights`.

    Attributes:
        path: the file read.
        sha256: its SHA-256.
        layout: ``"swinvit"`` (encoder only) or ``"swinunetr"`` (whole network).
        loaded: backbone parameter names (relative to ``model.backbone``) that received weights.
        missing: backbone tensors the file did not provide (they keep their initialisation).
        unexpected: file tensors with no place in the backbone (e.g. the ``out`` head), file names.
        shape_mismatched: ``"name: file shape vs model shape"`` for tensors that were not loaded.
        patch_merging: the patch merging the backbone now computes.
    """

    path: Path
    sha256: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatched: list[str] = field(default_factory=list)
    patch_merging: str = "merging"

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "sha256": self.sha256, "layout": self.layout, "loaded": len(self.loaded),
            "missing": self.missing, "unexpected": self.unexpected, "shape_mismatched": self.shape_mismatched,
            "patch_merging": self.patch_merging,
        }  # fmt: skip

    def __str__(self) -> str:
        head = f"{self.path.name} ({self.layout}, sha256 {self.sha256[:12]}...)"
        parts = [f"{head}: loaded {len(self.loaded)} tensors"]
        if self.missing:
            parts.append(f"{len(self.missing)} kept their initialisation (e.g. {self.missing[0]})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} file tensors unused (e.g. {self.unexpected[0]})")
        if self.shape_mismatched:
            parts.append(f"{len(self.shape_mismatched)} of another shape (e.g. {self.shape_mismatched[0]})")
        parts.append(f"patch merging {self.patch_merging}")
        return "; ".join(parts)


def map_monai_key(name: str) -> str | None:
    """MoME backbone name (relative to ``model.backbone``) of a MONAI checkpoint tensor name.

    ``module.`` / ``swin_vit`` spellings and the bare encoder layout are normalised to
    ``swinViT.*``; ``mlp.fc1``/``mlp.fc2`` become MONAI's ``mlp.linear1``/``mlp.linear2``.
    Returns ``None`` for names outside a SwinUNETR.
    """
    if name.startswith("module."):
        name = name[len("module.") :]
    if name.startswith("backbone."):
        name = name[len("backbone.") :]
    if name.startswith("swin_vit."):
        name = "swinViT." + name[len("swin_vit.") :]
    if name.startswith(_SWINVIT_PARTS):
        name = "swinViT." + name
    if not name.startswith(_SWINUNETR_BLOCKS):
        return None
    return name.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")


def load_backbone_weights(
    model: nn.Module, path: str | os.PathLike, legacy_patch_merging: bool | None = None
) -> BackboneLoadReport:
    """Copy MONAI Swin UNETR weights into ``model.backbone``.

    Args:
        model: a :class:`~MoMESegmentationLib.model.MoME` (or a module with a ``backbone``
            attribute that is a MONAI ``SwinUNETR``).
        path: ``model_swinvit.pt`` or ``swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt`` (or any
            file with either layout); read with ``weights_only=True``.
        legacy_patch_merging: switch the backbone to the pre-MONAI-1.5 patch merging these
            weights were trained with (:mod:`~MoMESegmentationLib.model.legacy_merging`). ``None``
            (default) does so when the model's config can record it
            (``MoMEConfig.swin_downsample="merging_legacy"``), so that checkpoints saved after
            training rebuild the same network; otherwise the
            current merging is kept (fine-tuning adapts the reduction layers) and a warning says so.

    Returns:
        :class:`BackboneLoadReport` (``str(report)`` is a one-line summary).

    Raises:
        CheckpointError: unsafe or unreadable file, or no tensor of it fits the backbone.
    """
    path = Path(path).expanduser()
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"model must have a backbone module, got {type(model).__name__}")
    state = find_state_dict(load_weights_only(path), path)
    state = strip_prefix(state, "module.")
    own = backbone.state_dict()

    report = BackboneLoadReport(path=path, sha256=sha256_file(path), layout="swinvit")
    if any(map_monai_key(k) and not map_monai_key(k).startswith("swinViT.") for k in state):
        report.layout = "swinunetr"
    updates: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        key = map_monai_key(name)
        if key is None or key not in own:
            report.unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(own[key].shape):
            report.shape_mismatched.append(f"{key}: {tuple(tensor.shape)} vs {tuple(own[key].shape)}")
            continue
        updates[key] = tensor
    useful = [k for k in updates if not k.endswith("relative_position_index")]
    if not useful or len(report.shape_mismatched) > len(useful):
        first_mismatch = report.shape_mismatched[0] if report.shape_mismatched else "none"
        raise CheckpointError(
            f"{path}: the file does not fit this backbone: {len(useful)} tensors fit, "
            f"{len(report.shape_mismatched)} have another shape (e.g. {first_mismatch}), "
            f"{len(report.unexpected)} are unknown; is it a MONAI Swin UNETR file of this feature size?"
        )
    with torch.no_grad():
        for key, tensor in updates.items():
            own[key].copy_(tensor.to(own[key].dtype))
    report.loaded = sorted(k for k in updates if not k.endswith("relative_position_index"))
    report.missing = sorted(k for k in own if k not in updates and not k.endswith("relative_position_index"))
    if legacy_patch_merging is None:
        legacy_patch_merging = legacy_config_supported() and hasattr(model, "config")
        if not legacy_patch_merging:
            logger.warning(
                "%s was trained with MONAI's pre-1.5 patch merging; this model config cannot record it, so "
                "the backbone keeps MONAI's current merging (fine-tuning adapts to it)",
                path.name,
            )
    if legacy_patch_merging:
        use_legacy_patch_merging(model)
    report.patch_merging = patch_merging_mode(model)
    logger.info("backbone initialised from %s", report)
    return report
