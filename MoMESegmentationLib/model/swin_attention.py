"""Swin window attention through ``torch.nn.functional.scaled_dot_product_attention``.

MONAI's :class:`~monai.networks.nets.swin_unetr.WindowAttention` computes window attention
explicitly: ``softmax(q k^T * scale + relative position bias [+ shift mask]) v``, which
materialises the ``[windows, heads, n, n]`` attention matrix (``n = 343`` tokens for 7^3 windows)
and a second copy for the mask sum. :class:`SDPAWindowAttention` computes the same thing with
PyTorch's fused attention: the relative position bias, plus the shifted-window mask where there
is one, is the additive ``attn_mask``; with a batch of several images the mask is broadcast over them
instead of being copied for each.

It is a subclass with no parameters or buffers of its own, so state dicts (and checkpoints) are
exactly MONAI's. :class:`~.backbone.SwinUNETRBackbone` uses it unless told otherwise
(``attention="monai"``, or the environment variable ``MOME_ATTENTION=monai`` for every network
built afterwards); :func:`use_sdpa_attention` switches a built network in place, either way.
Nothing about it is stored in a checkpoint. MONAI >= 1.5 has a similar switch of its own
(``use_flash_attention``) that works only without autograd, expands the shift mask to the whole
batch and is absent from MONAI 1.4, which the project still supports.

The result equals MONAI's up to floating-point rounding (``Testing/Python/test_swin_attention.py``).
On the 2-core CPU build machine it encodes a 96^3 window of MoME-12 1.68x faster (3.16 -> 1.88 s)
and runs ``mome demo``'s inference 1.63x faster (``benchmarks/RESULTS.md``, CPU inference paths).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn

__all__ = ["ATTENTION_MODES", "SDPAWindowAttention", "attention_mode", "default_attention", "use_sdpa_attention"]

#: ``"sdpa"``: :class:`SDPAWindowAttention`; ``"monai"``: MONAI's ``WindowAttention`` as it is.
ATTENTION_MODES = ("sdpa", "monai")


def default_attention() -> str:
    """The attention new networks get: ``$MOME_ATTENTION`` when set, else ``"sdpa"``."""
    mode = os.environ.get("MOME_ATTENTION", "sdpa").strip().lower() or "sdpa"
    if mode not in ATTENTION_MODES:
        raise ValueError(f"MOME_ATTENTION must be one of {', '.join(ATTENTION_MODES)}, got {mode!r}")
    return mode


class SDPAWindowAttention(WindowAttention):
    """MONAI's ``WindowAttention`` (same constructor, parameters and buffers) computed by SDPA.

    ``forward(x, mask)``: ``x`` is ``[B * nW, n, C]`` (windows of ``B`` images, ``nW`` windows each);
    ``mask`` is ``None`` or MONAI's shifted-window mask ``[nW, n, n]`` (0 within a region, -100
    across regions).
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B * nW, heads, n, d]
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[index].reshape(n, n, heads).permute(2, 0, 1).contiguous()
        if mask is None:
            bias = bias.unsqueeze(0)  # [1, heads, n, n]: the fused CPU kernel wants 4D inputs
        else:
            nw = mask.shape[0]
            if b % nw:
                raise ValueError(f"{b} windows are not a whole number of images of {nw} windows")
            bias = bias.unsqueeze(0) + mask.to(bias.dtype).unsqueeze(1)  # [nW, heads, n, n]
            if b > nw:
                # Windows and heads are both batch axes of the attention: fold them together so that
                # the [nW * heads, n, n] mask broadcasts over the images instead of being copied.
                bias = bias.reshape(1, nw * heads, n, n)
                q, k, v = (t.reshape(b // nw, nw * heads, n, -1) for t in (q, k, v))
        dropout = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout, scale=self.scale
        )
        out = out.reshape(b, heads, n, -1).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


def _attention_modules(model: nn.Module) -> list[WindowAttention]:
    return [m for m in model.modules() if isinstance(m, WindowAttention)]


def use_sdpa_attention(model: nn.Module, enabled: bool = True) -> int:
    """Compute every Swin window attention of ``model`` with SDPA (or, ``enabled=False``, MONAI's code).

    Switches the modules' class in place: parameters, buffers, device and training mode stay as
    they are, so this can run before or after weights are loaded.

    Returns:
        The number of attention modules switched (0 when they already were as asked).
    """
    target = SDPAWindowAttention if enabled else WindowAttention
    switched = 0
    for module in _attention_modules(model):
        if type(module) is not target:
            module.__class__ = target
            switched += 1
    return switched


def attention_mode(model: nn.Module) -> str | None:
    """``"sdpa"``, ``"monai"``, ``"mixed"``, or ``None`` when ``model`` has no Swin window attention."""
    kinds = {"sdpa" if isinstance(m, SDPAWindowAttention) else "monai" for m in _attention_modules(model)}
    if not kinds:
        return None
    return kinds.pop() if len(kinds) == 1 else "mixed"
