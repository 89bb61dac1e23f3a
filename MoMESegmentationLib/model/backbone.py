"""SwinUNETR backbone that exposes its multi-scale decoder features.

MoME uses the decoder of MONAI's :class:`~monai.networks.nets.SwinUNETR` as its bank of
visual experts. :class:`SwinUNETRBackbone` subclasses the MONAI network, keeps its blocks
(``swinViT``, ``encoder1..4``, ``encoder10``, ``decoder5..1``) and their parameter names, and
replaces the segmentation output with :meth:`SwinUNETRBackbone.forward_features`, which returns
every decoder stage instead of a logit map. The final ``out`` convolution is removed, so it holds
no parameters that would never receive a gradient.

Decoder scales (``fs`` is ``feature_size``; input ``[B, C, D, H, W]``, ``D, H, W`` divisible by 32,
and the 1/32 bottleneck must hold more than one voxel because MONAI's blocks use instance norm,
so 64x32x32 is the smallest input):

======  ===============  ========  ===========  ====================================
scale   MONAI name       channels  resolution   computed by
======  ===============  ========  ===========  ====================================
0       ``out``          fs        1            ``decoder1(dec0, encoder1(x))``
1       ``dec0``         fs        1/2          ``decoder2(dec1, encoder2(h0))``
2       ``dec1``         2 fs      1/4          ``decoder3(dec2, encoder3(h1))``
3       ``dec2``         4 fs      1/8          ``decoder4(dec3, encoder4(h2))``
4       ``dec3``         8 fs      1/16         ``decoder5(dec4, h3)``
bottle  ``dec4``         16 fs     1/32         ``encoder10(h4)``
======  ===============  ========  ===========  ====================================

``h0..h4`` are the hidden states of the Swin transformer. The bottleneck returned here is
``encoder10``'s output (``dec4``), which is what the CLIP-Driven Universal Model pools for its
global image feature.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from monai.networks.nets import SwinUNETR

from .legacy_merging import LEGACY_MERGING, LegacyPatchMerging
from .swin_attention import ATTENTION_MODES, default_attention, use_sdpa_attention

__all__ = ["NUM_DECODER_SCALES", "SwinUNETRBackbone", "decoder_channels"]

#: Number of decoder stages exposed as features (full resolution down to 1/16).
NUM_DECODER_SCALES = 5
#: Total down-sampling factor of SwinUNETR (patch size 2, five stages): inputs must be divisible by it.
SWIN_DIVISOR = 32


def decoder_channels(feature_size: int) -> list[int]:
    """Channels of the decoder outputs at scales 0..4 for a SwinUNETR of ``feature_size``."""
    return [feature_size, feature_size, 2 * feature_size, 4 * feature_size, 8 * feature_size]


class SwinUNETRBackbone(SwinUNETR):
    """MONAI SwinUNETR without its output head, returning multi-scale decoder features.

    Args:
        in_channels: image channels.
        feature_size: SwinUNETR embedding size (multiple of 12).
        depths: Swin blocks per stage.
        num_heads: attention heads per stage.
        finest_scale: finest decoder scale that is needed (0 = full resolution). Blocks that only
            serve finer scales are removed and not computed.
        drop_rate: dropout rate inside the Swin transformer.
        attn_drop_rate: attention dropout rate.
        dropout_path_rate: stochastic depth rate.
        use_checkpoint: gradient checkpointing of the Swin blocks.
        downsample: patch-merging variant: ``"merging"`` (MONAI's ``PatchMerging``; its voxel order
            changed in MONAI 1.5), ``"mergingv2"``, or ``"merging_legacy"`` (the pre-1.5 order that
            published Swin UNETR and Universal Model weights were trained with; see
            :mod:`.legacy_merging`).
        use_v2: SwinUNETR-V2 residual convolution at the start of each stage.
        patch_size: training patch size; only passed to MONAI releases whose constructor still
            requires ``img_size``.
        attention: Swin window attention: ``"sdpa"`` (fused
            ``scaled_dot_product_attention``, :mod:`.swin_attention`) or ``"monai"`` (MONAI's
            explicit softmax); same parameters and results either way. ``None``:
            :func:`~.swin_attention.default_attention`.

    Example::

        >>> net = SwinUNETRBackbone(in_channels=1, feature_size=12)
        >>> decoder, bottleneck = net.forward_features(torch.zeros(1, 1, 64, 32, 32))
        >>> [tuple(f.shape) for f in decoder]
        [(1, 12, 64, 32, 32), (1, 12, 32, 16, 16), (1, 24, 16, 8, 8), (1, 48, 8, 4, 4), (1, 96, 4, 2, 2)]
        >>> tuple(bottleneck.shape)
        (1, 192, 2, 1, 1)
    """

    def __init__(
        self,
        in_channels: int = 1,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        finest_scale: int = 0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        downsample: str = "merging",
        use_v2: bool = False,
        patch_size: Sequence[int] = (96, 96, 96),
        attention: str | None = None,
    ) -> None:
        if not 0 <= finest_scale < NUM_DECODER_SCALES:
            raise ValueError(f"finest_scale must be in 0..{NUM_DECODER_SCALES - 1}, got {finest_scale}")
        if downsample not in ("merging", "mergingv2", "merging_legacy"):
            raise ValueError(f"downsample must be 'merging', 'mergingv2' or 'merging_legacy', got {downsample!r}")
        attention = default_attention() if attention is None else attention
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
        merging: str | type = LegacyPatchMerging if downsample == LEGACY_MERGING else downsample
        kwargs = dict(
            in_channels=in_channels,
            out_channels=1,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            feature_size=feature_size,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            dropout_path_rate=dropout_path_rate,
            use_checkpoint=use_checkpoint,
            spatial_dims=3,
            downsample=merging,
            use_v2=use_v2,
        )
        img_size = inspect.signature(SwinUNETR.__init__).parameters.get("img_size")
        if img_size is not None and img_size.default is inspect.Parameter.empty:
            kwargs["img_size"] = tuple(patch_size)  # MONAI < 1.5
        super().__init__(**kwargs)
        del self.out  # replaced by the MoME heads; never computed
        use_sdpa_attention(self, attention == "sdpa")
        self.feature_size = feature_size
        self.finest_scale = finest_scale
        for scale in range(finest_scale):
            # Scale s is produced by decoder(s+1) with the skip connection of encoder(s+1).
            delattr(self, f"decoder{scale + 1}")
            if scale + 1 <= 4:
                delattr(self, f"encoder{scale + 1}")

    @property
    def decoder_channels(self) -> list[int]:
        """Channels of the decoder features at scales 0..4."""
        return decoder_channels(self.feature_size)

    @property
    def bottleneck_channels(self) -> int:
        """Channels of the bottleneck feature (``16 * feature_size``)."""
        return 16 * self.feature_size

    def forward_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """Run the encoder and decoder, keeping every decoder stage.

        Args:
            x: image ``[B, C, D, H, W]`` with ``D, H, W`` divisible by 32.

        Returns:
            ``(decoder, bottleneck)``: ``decoder[s]`` is the scale-``s`` feature
            ``[B, C_s, D / 2**s, H / 2**s, W / 2**s]`` (``None`` for ``s < finest_scale``) and
            ``bottleneck`` is ``[B, 16 * feature_size, D / 32, H / 32, W / 32]``.
        """
        hidden = self.swinViT(x, self.normalize)
        bottleneck = self.encoder10(hidden[4])
        decoder: list[torch.Tensor | None] = [None] * NUM_DECODER_SCALES
        decoder[4] = self.decoder5(bottleneck, hidden[3])
        # Scales 3..0: decoder(s+1) upsamples scale s+1 with the skip of encoder(s+1);
        # encoder1 reads the image, encoder(s+1) for s >= 1 reads Swin hidden state s-1.
        for scale in range(3, self.finest_scale - 1, -1):
            skip_input = x if scale == 0 else hidden[scale - 1]
            skip = getattr(self, f"encoder{scale + 1}")(skip_input)
            decoder[scale] = getattr(self, f"decoder{scale + 1}")(decoder[scale + 1], skip)
        return decoder, bottleneck

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor | None], torch.Tensor]:  # type: ignore[override]
        """Same as :meth:`forward_features`."""
        return self.forward_features(x)
