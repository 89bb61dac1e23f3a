"""The MoME network: SwinUNETR experts, text-guided router and prompt-specific heads."""

from __future__ import annotations

from .backbone import SwinUNETRBackbone
from .experts import ExpertProjection, ImageFeatures
from .factory import MODEL_CONFIGS, create_model, get_config, list_models
from .heads import DynamicHead
from .mome import MoME, MoMEConfig
from .router import RouterOutput, TextGuidedRouter, switch_balance_loss, top_k_gates
from .swin_attention import SDPAWindowAttention, attention_mode, use_sdpa_attention

__all__ = [
    "MoMEConfig",
    "MoME",
    "ImageFeatures",
    "RouterOutput",
    "create_model",
    "list_models",
    "get_config",
    "MODEL_CONFIGS",
    "SwinUNETRBackbone",
    "ExpertProjection",
    "TextGuidedRouter",
    "DynamicHead",
    "top_k_gates",
    "switch_balance_loss",
    "SDPAWindowAttention",
    "use_sdpa_attention",
    "attention_mode",
]
