"""Named MoME variants and the model factory (timm style).

``create_model(name, **overrides)`` is the public constructor; ``list_models()`` lists the
variants. Variants are plain entries of :data:`MODEL_CONFIGS`; nothing registers itself on import.

=================  ===========================================================================
name               architecture
=================  ===========================================================================
``mome-12``        SwinUNETR feature size 12, five experts (scales 0-4), 384-d text (MiniLM)
``mome-24``        SwinUNETR feature size 24, five experts, 384-d text
``mome-48``        SwinUNETR feature size 48 (the paper's backbone), five experts, 384-d text
``universal-model`` CLIP-Driven Universal Model layout: feature size 48, one expert (the
                   full-resolution decoder output through ``precls_conv``), 512-d CLIP text,
                   so the published Universal Model weights map onto it (see :mod:`.mome`)
=================  ===========================================================================
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from .mome import MoME, MoMEConfig

__all__ = ["MODEL_CONFIGS", "create_model", "list_models", "get_config"]

MODEL_CONFIGS: dict[str, MoMEConfig] = {
    "mome-12": MoMEConfig(feature_size=12),
    "mome-24": MoMEConfig(feature_size=24),
    "mome-48": MoMEConfig(feature_size=48),
    "universal-model": MoMEConfig(
        feature_size=48,
        expert_scales=(0,),
        expert_channels=8,  # precls_conv: GroupNorm(16, 48) -> ReLU -> Conv3d(48, 8)
        head_projection=False,
        text_dim=512,  # CLIP ViT-B/32 text embeddings
        text_proj_dim=256,
        global_dim=256,
        top_k=None,
    ),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(MODEL_CONFIGS)


def get_config(name: str, **overrides: Any) -> MoMEConfig:
    """The configuration of variant ``name`` with ``overrides`` applied (validated)."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    known = {f.name for f in fields(MoMEConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown MoMEConfig fields for {name!r}: {', '.join(unknown)}")
    return replace(MODEL_CONFIGS[name], **overrides)


def create_model(name_or_config: str | MoMEConfig, **overrides: Any) -> MoME:
    """Build a (randomly initialised) MoME network.

    Args:
        name_or_config: a name from :func:`list_models` or a :class:`MoMEConfig`.
        overrides: ``MoMEConfig`` fields to change, e.g. ``feature_size=12``.

    Returns:
        The network, in training mode; ``model.variant`` is the name (``"custom"`` for a config).

    Example::

        >>> model = create_model("mome-12", patch_size=(64, 64, 64))
    """
    if isinstance(name_or_config, MoMEConfig):
        config = replace(name_or_config, **overrides) if overrides else name_or_config
        return MoME(config, variant="custom")
    if not isinstance(name_or_config, str):
        raise ValueError(
            f"name_or_config must be a model name or MoMEConfig, got {type(name_or_config).__name__}"
        )
    return MoME(get_config(name_or_config, **overrides), variant=name_or_config)
