"""MoME: Mixture of Visual-Language Medical Experts for text-prompted 3D CT segmentation.

The network (Rezvani et al., arXiv 2510.26996) builds on the CLIP-Driven Universal Model
(Liu et al., ICCV 2023):

* **vision branch** -- a MONAI SwinUNETR whose decoder stages (full resolution down to 1/16)
  are the *experts*, each projected to a common width ``Ce``
  (:class:`~.backbone.SwinUNETRBackbone`, :class:`~.experts.ExpertProjection`);
* **text branch** -- prompts arrive as embeddings ``[K, T]`` from a text encoder outside the
  network, projected by ``text_to_vision`` (``Linear(T, 256)`` + ReLU);
* **text-guided router** -- per prompt and per voxel, softmax gates over the experts
  (:class:`~.router.TextGuidedRouter`);
* **prompt-specific heads** -- the routed fusion of expert features is projected to 8 channels
  and segmented by a dynamic 8 -> 8 -> 8 -> 1 head whose 153 parameters a controller predicts from
  ``[global image feature; projected prompt]`` (:class:`~.heads.DynamicHead`).

Inference is split in two stages (timm's ``forward_features`` / ``forward_head``):
:meth:`MoME.encode` is prompt-free and can be cached per sliding window; :meth:`MoME.decode`
takes any number of prompts. :meth:`MoME.forward` is exactly ``decode(encode(image), ...)``.

Module names and the Universal Model checkpoint (``universal-model`` variant: one expert at
scale 0 with ``expert_channels=8``, no head projection, ``text_dim=512``)::

    Universal Model key                      MoME key
    backbone.<block>.*  (not backbone.out.*) backbone.<block>.*
    precls_conv.{0,2}.*                      experts.0.{0,2}.*
    GAP.{0,3}.*                              global_pool.{0,3}.*
    text_to_vision.*                         text_to_vision.*
    controller.*                             head.controller.*
    organ_embedding  [N, 512] buffer         checkpoint structure table ``vocab.embeddings``

The router of a single-expert model has no parameters (every gate is 1), so the fused features
are the expert features and the forward pass equals the Universal Model's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .backbone import NUM_DECODER_SCALES, SWIN_DIVISOR, SwinUNETRBackbone, decoder_channels
from .experts import ExpertProjection, ImageFeatures, group_count
from .heads import DynamicHead
from .masked_norm import convert_norms, valid_voxels
from .router import RouterOutput, TextGuidedRouter, resize, switch_balance_loss

__all__ = ["MoMEConfig", "MoME"]


def _check_spatial_size(size: tuple[int, ...], what: str) -> None:
    """SwinUNETR needs sizes divisible by 32 and a bottleneck of more than one voxel (instance norm)."""
    if any(s < SWIN_DIVISOR or s % SWIN_DIVISOR for s in size):
        raise ValueError(f"{what} {tuple(size)} must be divisible by {SWIN_DIVISOR}")
    if math.prod(s // SWIN_DIVISOR for s in size) < 2:
        raise ValueError(
            f"{what} {tuple(size)} is too small: the 1/{SWIN_DIVISOR} bottleneck needs at least 2 voxels "
            f"(e.g. 64x32x32)"
        )


@dataclass
class MoMEConfig:
    """Architecture of a :class:`MoME` network (stored with every checkpoint)."""

    in_channels: int = 1  # image channels (1 for CT)
    feature_size: int = 48  # SwinUNETR embedding size, a multiple of 12
    patch_size: tuple[int, int, int] = (96, 96, 96)  # training / sliding-window patch, each divisible by 32
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)  # Swin blocks per stage
    num_heads: tuple[int, int, int, int] = (3, 6, 12, 24)  # attention heads per Swin stage
    expert_scales: tuple[int, ...] = (
        0,
        1,
        2,
        3,
        4,
    )  # decoder scales used as experts (0 = full res, 4 = 1/16)
    expert_channels: int = 16  # common width Ce of the expert projections
    norm_groups: int = 16  # maximum GroupNorm groups (reduced to a divisor of the channels)
    text_dim: int = 384  # width T of the prompt embeddings from the text encoder
    text_proj_dim: int = 256  # width of the projected prompt (text_to_vision)
    global_dim: int = 256  # width of the pooled global image feature
    router_hidden: int = 32  # hidden width of the routing MLP
    router_scale: int = 1  # routing logits at 1/2**router_scale resolution, upsampled to every voxel
    top_k: int | None = None  # keep the top-k gates per voxel (None: dense softmax over all experts)
    head_channels: int = 8  # width of the dynamic head (Universal Model: 8)
    head_layers: int = 3  # dynamic 1x1x1 convolutions per head (Universal Model: 3)
    head_projection: bool = True  # 1x1x1 conv expert_channels -> head_channels; False needs equal widths
    prompt_chunk: int = 8  # prompts decoded together; bounds peak memory, results do not depend on it
    use_checkpoint: bool = False  # gradient checkpointing in the Swin transformer
    swin_downsample: str = "merging"  # SwinUNETR patch merging: "merging", "mergingv2" or "merging_legacy" (pre-MONAI-1.5 order)
    use_v2: bool = False  # SwinUNETR-V2 residual convolution blocks
    dropout: float = 0.0  # dropout in the Swin transformer
    attn_dropout: float = 0.0  # attention dropout in the Swin transformer
    drop_path: float = 0.0  # stochastic depth rate in the Swin transformer

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists.
        self.patch_size = tuple(int(s) for s in self.patch_size)  # type: ignore[assignment]
        self.depths = tuple(int(s) for s in self.depths)  # type: ignore[assignment]
        self.num_heads = tuple(int(s) for s in self.num_heads)  # type: ignore[assignment]
        self.expert_scales = tuple(int(s) for s in self.expert_scales)
        positive = (
            "in_channels", "feature_size", "expert_channels", "norm_groups", "text_dim", "text_proj_dim",
            "global_dim", "router_hidden", "head_channels", "head_layers", "prompt_chunk",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.feature_size % 12:
            raise ValueError(f"feature_size must be a multiple of 12, got {self.feature_size}")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 sizes, got {self.patch_size}")
        _check_spatial_size(self.patch_size, "patch_size")
        if len(self.depths) != 4 or min(self.depths) < 1:
            raise ValueError(f"depths must be 4 positive integers, got {self.depths}")
        if len(self.num_heads) != 4 or min(self.num_heads) < 1:
            raise ValueError(f"num_heads must be 4 positive integers, got {self.num_heads}")
        scales = self.expert_scales
        if (
            not scales
            or len(set(scales)) != len(scales)
            or not all(0 <= s < NUM_DECODER_SCALES for s in scales)
        ):
            raise ValueError(
                f"expert_scales must be distinct scales in 0..{NUM_DECODER_SCALES - 1}, "
                f"got {self.expert_scales}"
            )
        if not 0 <= self.router_scale < NUM_DECODER_SCALES:
            raise ValueError(f"router_scale must be in 0..{NUM_DECODER_SCALES - 1}, got {self.router_scale}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and 1 <= self.top_k <= len(scales)):
            raise ValueError(
                f"top_k must be None or in 1..{len(scales)} (number of experts), got {self.top_k}"
            )
        if not self.head_projection and self.expert_channels != self.head_channels:
            raise ValueError(
                f"head_projection=False needs expert_channels == head_channels, "
                f"got {self.expert_channels} and {self.head_channels}"
            )
        if self.swin_downsample not in ("merging", "mergingv2", "merging_legacy"):
            raise ValueError(
                f"swin_downsample must be 'merging', 'mergingv2' or 'merging_legacy', got {self.swin_downsample!r}"
            )
        for name in ("dropout", "attn_dropout", "drop_path"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    @property
    def num_experts(self) -> int:
        """Number of experts ``E``."""
        return len(self.expert_scales)

    def to_dict(self) -> dict:
        """JSON-serialisable dictionary (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MoMEConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoMEConfig fields: {', '.join(unknown)}")
        return cls(**data)


class MoME(nn.Module):
    """Text-prompted Mixture-of-Experts segmentation network.

    Args:
        config: architecture (defaults to ``MoMEConfig()``).
        variant: name recorded in checkpoints (set by :func:`create_model`).

    Example::

        >>> model = MoME(MoMEConfig(feature_size=12, patch_size=(64, 32, 32)))
        >>> image = torch.rand(2, 1, 64, 32, 32)           # [B, C, D, H, W], intensities in [0, 1]
        >>> prompts = torch.randn(3, 384)                  # [K, T] text embeddings
        >>> model(image, prompts).shape                    # [B, K, D, H, W] logits
        torch.Size([2, 3, 64, 32, 32])
    """

    def __init__(self, config: MoMEConfig | None = None, variant: str = "custom") -> None:
        super().__init__()
        self.config = config = config if config is not None else MoMEConfig()
        self.variant = variant
        fs = config.feature_size
        self.backbone = SwinUNETRBackbone(
            in_channels=config.in_channels,
            feature_size=fs,
            depths=config.depths,
            num_heads=config.num_heads,
            finest_scale=min(config.expert_scales),
            drop_rate=config.dropout,
            attn_drop_rate=config.attn_dropout,
            dropout_path_rate=config.drop_path,
            use_checkpoint=config.use_checkpoint,
            downsample=config.swin_downsample,
            use_v2=config.use_v2,
            patch_size=config.patch_size,
        )
        channels = decoder_channels(fs)
        self.experts = nn.ModuleList(
            ExpertProjection(channels[s], config.expert_channels, config.norm_groups)
            for s in config.expert_scales
        )
        bottleneck = self.backbone.bottleneck_channels
        self.global_pool = nn.Sequential(
            nn.GroupNorm(group_count(bottleneck, config.norm_groups), bottleneck),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool3d(1),
            nn.Conv3d(bottleneck, config.global_dim, kernel_size=1),
        )
        self.text_to_vision = nn.Linear(config.text_dim, config.text_proj_dim)
        self.router = TextGuidedRouter(
            num_experts=config.num_experts,
            expert_channels=config.expert_channels,
            text_channels=config.text_proj_dim,
            hidden=config.router_hidden,
            top_k=config.top_k,
        )
        self.head_projection: nn.Module = (
            nn.Conv3d(config.expert_channels, config.head_channels, kernel_size=1)
            if config.head_projection
            else nn.Identity()
        )
        self.head = DynamicHead(
            config.global_dim + config.text_proj_dim, config.head_channels, config.head_layers
        )
        # Instance/group norms and the global pool can skip padding (see encode's ``valid``).
        convert_norms(self)

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    # -- stage 1: prompt-free ------------------------------------------------------------
    def encode(self, image: torch.Tensor, valid: torch.Tensor | None = None) -> ImageFeatures:
        """Prompt-free image features.

        Args:
            image: ``[B, C, D, H, W]`` preprocessed CT (intensities scaled to [0, 1]),
                ``D, H, W`` divisible by 32 and at least 64 voxels along one axis.
            valid: optional ``[B, 1, D, H, W]`` (or ``[1, 1, D, H, W]``) mask of the voxels that hold
                the scan, false where a window was padded beyond it: instance/group norms and the
                global pool then take their statistics over the valid voxels only
                (:mod:`~.masked_norm`). ``None`` means every voxel is valid.

        Returns:
            :class:`ImageFeatures` with ``E`` expert maps at their own scales and the global feature.
        """
        if image.ndim != 5 or image.shape[1] != self.config.in_channels:
            raise ValueError(
                f"image must be [B, {self.config.in_channels}, D, H, W], got {tuple(image.shape)}"
            )
        spatial = tuple(int(s) for s in image.shape[2:])
        _check_spatial_size(spatial, "image spatial size")
        if valid is not None and (valid.ndim != 5 or tuple(valid.shape[2:]) != spatial
                                  or valid.shape[0] not in (1, image.shape[0])):
            raise ValueError(f"valid must be [B, 1, {', '.join(map(str, spatial))}], got {tuple(valid.shape)}")
        with valid_voxels(valid):
            decoder, bottleneck = self.backbone.forward_features(image)
            experts = [proj(decoder[s]) for proj, s in zip(self.experts, self.config.expert_scales, strict=True)]
            global_feature = self.global_pool(bottleneck).flatten(1)
        return ImageFeatures(experts, global_feature, spatial)

    # -- stage 2: prompts ------------------------------------------------------------------
    def decode(
        self, features: ImageFeatures, prompt_embeddings: torch.Tensor, return_aux: bool = False,
        return_gates: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, RouterOutput] | tuple[torch.Tensor, torch.Tensor]:
        """Segment ``K`` prompts from cached image features.

        Args:
            features: output of :meth:`encode` for ``B`` windows.
            prompt_embeddings: text embeddings ``[K, T]`` (shared by all windows) or ``[B, K, T]``.
            return_aux: also return the :class:`RouterOutput` (gates, usage, balancing loss).
            return_gates: also return the router's gates ``[B, K, E, D, H, W]`` and nothing else of
                the routing (no dispatch mask, no balancing loss): what inference needs to show the
                routing (:mod:`~MoMESegmentationLib.explain`). The logits do not depend on it.

        Returns:
            Logits ``[B, K, D, H, W]``, ``(logits, RouterOutput)`` when ``return_aux``, or
            ``(logits, gates)`` when ``return_gates``.
        """
        if return_aux and return_gates:
            raise ValueError("return_aux already holds the gates (RouterOutput.weights); ask for one of them")
        cfg = self.config
        if len(features.experts) != cfg.num_experts:
            raise ValueError(
                f"features hold {len(features.experts)} experts, the model has {cfg.num_experts}"
            )
        text = self._prompt_batch(prompt_embeddings, features.batch_size)
        dtype = self.text_to_vision.weight.dtype
        features = features.to(dtype=dtype) if features.dtype != dtype else features
        b, k = text.shape[:2]
        size = features.spatial_size

        text = torch.relu(self.text_to_vision(text.to(dtype)))  # [B, K, text_proj_dim]
        condition = torch.cat([features.global_feature.unsqueeze(1).expand(b, k, -1), text], dim=-1)
        params = self.head.parameters_for(condition)  # [B, K, num_params]

        route_size = tuple(s // 2**cfg.router_scale for s in size)
        descriptors = self.router.descriptors(features.experts, route_size)
        head_inputs = [resize(self.head_projection(x), size) for x in features.experts]  # E x [B, C, D, H, W]

        logits, weights, usage, prob_mean, dispatch_mean = [], [], [], [], []
        for start in range(0, k, cfg.prompt_chunk):
            chunk = slice(start, start + cfg.prompt_chunk)
            gates, probs, dispatch = self.router(descriptors, text[:, chunk], size, with_dispatch=return_aux)
            fused = self._fuse(gates, head_inputs)  # [B, k, C, D, H, W]
            logits.append(self.head(fused, params[:, chunk]))
            if return_aux or return_gates:
                weights.append(gates)
            if return_aux:
                usage.append(gates.mean(dim=(3, 4, 5)))
                prob_mean.append(probs.float().mean(dim=(3, 4, 5)))
                dispatch_mean.append(dispatch.float().mean(dim=(3, 4, 5)))
        out = torch.cat(logits, dim=1) if len(logits) > 1 else logits[0]
        if return_gates:
            return out, torch.cat(weights, dim=1) if len(weights) > 1 else weights[0]
        if not return_aux:
            return out
        # Every prompt covers the same number of voxels, so the mean of per-prompt means is the global mean.
        balance = switch_balance_loss(torch.cat(prob_mean, dim=1), torch.cat(dispatch_mean, dim=1), dim=2)
        aux = RouterOutput(
            weights=torch.cat(weights, dim=1), usage=torch.cat(usage, dim=1), balance_loss=balance
        )
        return out, aux

    def forward(
        self, image: torch.Tensor, prompt_embeddings: torch.Tensor, return_aux: bool = False,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, RouterOutput]:
        """``decode(encode(image, valid), prompt_embeddings, return_aux)``: logits ``[B, K, D, H, W]``."""
        return self.decode(self.encode(image, valid), prompt_embeddings, return_aux=return_aux)

    # -- helpers ---------------------------------------------------------------------------
    def _prompt_batch(self, prompt_embeddings: torch.Tensor, batch: int) -> torch.Tensor:
        """Validate prompt embeddings and return them as ``[B, K, T]``."""
        t = self.config.text_dim
        e = prompt_embeddings
        if e.ndim == 2:
            e = e.unsqueeze(0)
        if e.ndim != 3 or e.shape[-1] != t or e.shape[1] < 1 or e.shape[0] not in (1, batch):
            raise ValueError(
                f"prompt_embeddings must be [K, {t}] or [{batch}, K, {t}] with K >= 1, "
                f"got {tuple(prompt_embeddings.shape)}"
            )
        return e.expand(batch, -1, -1)

    @staticmethod
    def _fuse(gates: torch.Tensor, head_inputs: list[torch.Tensor]) -> torch.Tensor:
        """Gate-weighted sum of expert features.

        The head projection is a 1x1x1 affine map and gates sum to 1 per voxel, so projecting each
        expert before fusing equals projecting the fused ``Ce``-channel feature, at lower cost.

        Args:
            gates: ``[B, K, E, D, H, W]``.
            head_inputs: ``E`` tensors ``[B, C, D, H, W]``.

        Returns:
            ``[B, K, C, D, H, W]``.
        """
        if len(head_inputs) == 1:
            return head_inputs[0].unsqueeze(1).expand(-1, gates.shape[1], -1, -1, -1, -1)
        fused = gates[:, :, :1] * head_inputs[0].unsqueeze(1)
        for e in range(1, len(head_inputs)):
            fused.addcmul_(gates[:, :, e : e + 1], head_inputs[e].unsqueeze(1))
        return fused
