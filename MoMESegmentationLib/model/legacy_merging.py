"""Swin patch merging as MONAI computed it before release 1.5, for weights trained with it.

Part of the network (``MoMEConfig.swin_downsample = "merging_legacy"``, built by
:class:`~.backbone.SwinUNETRBackbone`); the importers of published weights use it from here.

A Swin stage ends with *patch merging*: the ``2 x 2 x 2`` sub-voxels of every cell are
concatenated along channels (``8 C``), layer-normalised and reduced to ``2 C`` by a linear map.
Until MONAI 1.4 the 3D ``PatchMerging`` concatenated the sub-voxels at offsets (d, h, w)::

    (0,0,0) (1,0,0) (0,1,0) (0,0,1) (1,0,1) (0,1,0) (0,0,1) (1,1,1)

-- (0,1,0) and (0,0,1) twice, (1,1,0) and (0,1,1) never (Project-MONAI/MONAI issues #4757 and
#8284). MONAI 1.5 (PR #8285) made the same class take all eight distinct offsets, which changes
both the LayerNorm statistics and what each column of the reduction sees. Weights trained
before that -- the CLIP-Driven Universal Model, whose code carries its own copy of that
SwinUNETR, and MONAI's self-supervised Swin UNETR weights -- need the old order; because of the
LayerNorm over the duplicated channels no permutation of their weights reproduces it in the new
order.

:class:`LegacyPatchMerging` is a drop-in module with the same parameters (``norm``,
``reduction``) as MONAI's, so state dicts load unchanged. :func:`use_legacy_patch_merging`
swaps it into a built network. A checkpoint records the choice as
``architecture.patch_merging = "merging_legacy"`` (and, where :class:`MoMEConfig` accepts it,
``swin_downsample = "merging_legacy"``); :func:`apply_checkpoint_patch_merging` is the hook that
rebuilds it after loading.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import PatchMergingV2
from torch import nn

__all__ = [
    "LEGACY_MERGING",
    "LEGACY_MERGING_OFFSETS",
    "LegacyPatchMerging",
    "legacy_config_supported",
    "use_legacy_patch_merging",
    "patch_merging_mode",
    "apply_checkpoint_patch_merging",
]

logger = logging.getLogger(__name__)

#: Name of the pre-1.5 patch merging in configs and checkpoint descriptions.
LEGACY_MERGING = "merging_legacy"
#: Sub-voxel offsets (d, h, w) in the order that MONAI < 1.5 concatenated them (with repeats).
LEGACY_MERGING_OFFSETS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (1, 0, 0),
    (0, 1, 0),
    (0, 0, 1),
    (1, 0, 1),
    (0, 1, 0),
    (0, 0, 1),
    (1, 1, 1),
)


class LegacyPatchMerging(PatchMergingV2):
    """MONAI < 1.5 ``PatchMerging``: the sub-voxel order of :data:`LEGACY_MERGING_OFFSETS`.

    Args:
        dim: channels ``C`` of the input.
        norm_layer: normalisation over the ``8 C`` concatenated channels.
        spatial_dims: 3 (2D input falls back to MONAI's unchanged 2D merging).

    Input ``[B, D, H, W, C]`` (channels last, as inside the Swin transformer); output
    ``[B, ceil(D/2), ceil(H/2), ceil(W/2), 2 C]``. Odd sizes are zero-padded at the end.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return super().forward(x)
        if x.ndim != 5:
            raise ValueError(f"expected [B, D, H, W, C] or [B, H, W, C], got {tuple(x.shape)}")
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        parts = [x[:, i::2, j::2, k::2, :] for i, j, k in LEGACY_MERGING_OFFSETS]
        return self.reduction(self.norm(torch.cat(parts, dim=-1)))


def _swin_stages(model: nn.Module) -> list[nn.Module]:
    """The Swin ``BasicLayer`` stages of a MoME, a SwinUNETR or a MONAI SwinTransformer."""
    root = model
    for attr in ("backbone", "swinViT"):
        if hasattr(root, attr):
            root = getattr(root, attr)
    stages = []
    for name in ("layers1", "layers2", "layers3", "layers4"):
        layers = getattr(root, name, None)
        if layers is not None:
            stages.extend(layers)
    if not stages:
        raise ValueError(f"{type(model).__name__} has no Swin transformer stages (layers1..layers4)")
    return stages


def legacy_config_supported() -> bool:
    """Whether :class:`MoMEConfig` accepts ``swin_downsample="merging_legacy"``."""
    from .mome import MoMEConfig  # imported on use: mome imports the backbone, which imports this module

    try:
        MoMEConfig(swin_downsample=LEGACY_MERGING)
    except ValueError:
        return False
    return True


def use_legacy_patch_merging(model: nn.Module) -> int:
    """Replace every Swin patch-merging module of ``model`` by :class:`LegacyPatchMerging`, in place.

    Parameters are copied, so this can run before or after weights are loaded. On a MoME network
    whose config accepts it, ``model.config.swin_downsample`` becomes ``"merging_legacy"`` so
    that checkpoints saved from it record the choice.

    Args:
        model: a :class:`~MoMESegmentationLib.model.MoME`, a MONAI ``SwinUNETR`` or its ``swinViT``.

    Returns:
        The number of modules replaced (0 if they were already legacy).
    """
    swapped = 0
    for stage in _swin_stages(model):
        old = getattr(stage, "downsample", None)
        if old is None or isinstance(old, LegacyPatchMerging):
            continue
        if not isinstance(old, PatchMergingV2):
            raise ValueError(f"cannot replace patch merging of type {type(old).__name__}")
        dim = old.reduction.in_features // 8
        new = LegacyPatchMerging(dim=dim, norm_layer=type(old.norm), spatial_dims=3)
        new.load_state_dict(old.state_dict())
        new.to(device=old.reduction.weight.device, dtype=old.reduction.weight.dtype)
        new.train(old.training)
        stage.downsample = new
        swapped += 1
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "swin_downsample") and legacy_config_supported():
        config.swin_downsample = LEGACY_MERGING
    if swapped:
        logger.debug("using MONAI < 1.5 patch merging in %d Swin stages", swapped)
    return swapped


def patch_merging_mode(model: nn.Module) -> str:
    """``"merging_legacy"``, ``"merging"`` or ``"mergingv2"``: what ``model``'s Swin stages compute."""
    from monai.networks.nets.swin_unetr import PatchMerging

    kinds = set()
    for stage in _swin_stages(model):
        module = getattr(stage, "downsample", None)
        if isinstance(module, LegacyPatchMerging):
            kinds.add(LEGACY_MERGING)
        elif isinstance(module, PatchMerging):
            kinds.add("merging")
        elif isinstance(module, PatchMergingV2):
            kinds.add("mergingv2")
    if len(kinds) != 1:
        raise ValueError(f"mixed or unknown patch merging: {sorted(kinds)}")
    return kinds.pop()


def apply_checkpoint_patch_merging(model: nn.Module, meta: dict) -> bool:
    """Rebuild the patch merging a checkpoint was saved with (hook for ``load_checkpoint``).

    Args:
        model: the network just built from ``meta["architecture"]["config"]``.
        meta: the checkpoint description.

    Returns:
        True when the legacy merging was (or already is) in place.
    """
    arch = meta.get("architecture", {})
    wanted = arch.get("patch_merging") or arch.get("config", {}).get("swin_downsample")
    if wanted != LEGACY_MERGING:
        return False
    use_legacy_patch_merging(model)
    return True
