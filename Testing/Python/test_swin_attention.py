"""SDPA window attention equals MONAI's, module by module and through the whole network."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets.swin_unetr import WindowAttention, compute_mask

from MoMESegmentationLib.model import create_model
from MoMESegmentationLib.model.backbone import SwinUNETRBackbone
from MoMESegmentationLib.model.swin_attention import (
    SDPAWindowAttention,
    attention_mode,
    default_attention,
    use_sdpa_attention,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOW = (7, 7, 7)


def _pair(dim: int, heads: int, window=WINDOW, seed: int = 0) -> tuple[WindowAttention, SDPAWindowAttention]:
    torch.manual_seed(seed)
    reference = WindowAttention(dim, heads, window, qkv_bias=True)
    # A bias table of realistic size (the default initialisation is std 0.02, which hides mistakes).
    with torch.no_grad():
        reference.relative_position_bias_table.normal_(0, 1)
    fast = SDPAWindowAttention(dim, heads, window, qkv_bias=True)
    fast.load_state_dict(reference.state_dict())
    return reference.eval(), fast.eval()


def test_same_parameters_and_state_dict_keys():
    reference, fast = _pair(12, 3)
    assert list(reference.state_dict()) == list(fast.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(value, fast.state_dict()[key]), key


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("shifted", [False, True])
def test_equals_monai_on_random_windows(images, shifted):
    """Plain and shifted windows (MONAI's -100 mask), one and several images per batch."""
    dim, heads = 24, 3
    reference, fast = _pair(dim, heads, seed=images + 2 * shifted)
    grid = (14, 21, 14)  # 2 x 3 x 2 windows of 7^3: with a shift, most windows straddle regions
    mask = compute_mask(list(grid), WINDOW, (3, 3, 3), torch.device("cpu")) if shifted else None
    windows = (grid[0] // 7) * (grid[1] // 7) * (grid[2] // 7)
    x = torch.randn(images * windows, 343, dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, got = reference(x, mask), fast(x, mask)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if shifted:  # the mask matters: without it the result differs
        with torch.no_grad():
            assert (fast(x, None) - expected).abs().max() > 1e-2


def test_equals_monai_for_a_window_smaller_than_seven():
    """Deep stages whose grid is smaller than a window attend over fewer tokens (n < 343)."""
    reference, fast = _pair(48, 6, window=(6, 6, 6))
    x = torch.randn(1, 216, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fast(x, None), reference(x, None), atol=1e-5, rtol=1e-5)


def test_gradients_equal_monai():
    reference, fast = _pair(12, 3)
    reference.train(), fast.train()
    mask = compute_mask([14, 7, 7], WINDOW, (3, 3, 3), torch.device("cpu"))
    x = torch.randn(2, 343, 12, generator=torch.Generator().manual_seed(5))
    grads = []
    for module in (reference, fast):
        module.zero_grad()
        module(x, mask).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-4)


def test_switching_a_network_keeps_its_weights_and_output():
    """The whole MoME gives the same logits with either attention; the switch goes both ways."""
    torch.manual_seed(0)
    model = create_model("mome-12", patch_size=(64, 32, 32)).eval()
    assert attention_mode(model) == default_attention() == "sdpa"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image = torch.rand(1, 1, 64, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = torch.randn(3, 384, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        fast = model(image, prompts)
        assert use_sdpa_attention(model, False) == 8  # 2 blocks in each of the 4 stages
        assert attention_mode(model) == "monai"
        reference = model(image, prompts)
        assert use_sdpa_attention(model, True) == 8 and use_sdpa_attention(model, True) == 0
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
    assert fast.abs().max() > 1e-2  # not trivially zero
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_backbone_choice_and_environment(monkeypatch):
    assert attention_mode(SwinUNETRBackbone(feature_size=12, attention="monai")) == "monai"
    monkeypatch.setenv("MOME_ATTENTION", "monai")
    assert attention_mode(SwinUNETRBackbone(feature_size=12)) == "monai"
    monkeypatch.setenv("MOME_ATTENTION", "flash")
    with pytest.raises(ValueError, match="MOME_ATTENTION"):
        default_attention()
    with pytest.raises(ValueError, match="attention must be"):
        SwinUNETRBackbone(feature_size=12, attention="flash")
