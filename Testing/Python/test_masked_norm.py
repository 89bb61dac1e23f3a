"""Norms and global pooling over the valid voxels of a window (MoMESegmentationLib.model.masked_norm)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from MoMESegmentationLib.model import masked_norm as mn
from MoMESegmentationLib.model.masked_norm import (
    MaskedAdaptiveAvgPool3d,
    MaskedGroupNorm,
    MaskedInstanceNorm3d,
    convert_norms,
    mask_like,
    masked_group_norm,
    valid_voxels,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plain_layers() -> nn.Sequential:
    torch.manual_seed(0)
    layers = nn.Sequential(
        nn.Conv3d(2, 8, 3, padding=1),
        nn.InstanceNorm3d(8, affine=True),
        nn.Sequential(nn.GroupNorm(4, 8), nn.InstanceNorm3d(8)),  # nested, the second without affine
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
    )
    for module in layers.modules():  # non-trivial affine parameters
        if isinstance(module, (nn.GroupNorm, nn.InstanceNorm3d)) and module.affine:
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
    return layers


def _box_mask(shape, box) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[(slice(None), slice(None), *box)] = True
    return mask


def test_convert_norms_swaps_every_norm_and_global_pool_keeping_state():
    plain = _plain_layers()
    keep = nn.AdaptiveAvgPool3d(2)  # not a global pool: stays as it is
    plain.append(keep)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    converted = convert_norms(_plain_layers().append(nn.AdaptiveAvgPool3d(2)))
    converted.load_state_dict(state)
    assert type(converted[1]) is MaskedInstanceNorm3d
    assert type(converted[2][0]) is MaskedGroupNorm and type(converted[2][1]) is MaskedInstanceNorm3d
    assert type(converted[4]) is MaskedAdaptiveAvgPool3d and type(converted[5]) is nn.AdaptiveAvgPool3d
    assert converted[2][0].num_groups == 4 and not converted[2][1].affine and converted[1].affine
    assert list(converted.state_dict()) == list(state)
    for key, value in convert_norms(plain).state_dict().items():
        assert torch.equal(value, state[key]), key


def test_masked_layers_without_mask_or_with_all_true_mask_equal_pytorch_exactly():
    x = torch.randn(2, 2, 6, 5, 4)
    plain = _plain_layers()
    converted = convert_norms(_plain_layers())
    expected = plain(x)
    assert torch.equal(converted(x), expected)
    with valid_voxels(torch.ones(2, 1, 6, 5, 4, dtype=torch.bool)):
        assert mask_like(x) is None  # an all-true mask costs nothing
        assert torch.equal(converted(x), expected)
    with valid_voxels(None):
        assert torch.equal(converted(x), expected)


@st.composite
def masked_inputs(draw):
    channels = draw(st.sampled_from([4, 6, 8]))
    groups = draw(st.sampled_from([g for g in (1, 2, channels // 2, channels) if channels % g == 0]))
    shape = draw(st.lists(st.integers(2, 6), min_size=3, max_size=3))
    batch = draw(st.integers(1, 2))
    boxes = []
    for _ in range(batch):  # a different valid box per batch element
        box = []
        for n in shape:
            start = draw(st.integers(0, n - 2))
            box.append(slice(start, draw(st.integers(start + 2, n))))
        boxes.append(tuple(box))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *shape, generator=generator) * 3 + 1
    mask = torch.zeros(batch, 1, *shape, dtype=torch.bool)
    for b, box in enumerate(boxes):
        mask[(b, slice(None), *box)] = True
    weight = torch.randn(channels, generator=generator)
    bias = torch.randn(channels, generator=generator)
    return x, mask, boxes, groups, weight, bias


@given(masked_inputs())
def test_masked_group_norm_equals_group_norm_of_the_valid_box(case):
    """Normalising under a box mask = cropping the box, then PyTorch's group/instance norm."""
    x, mask, boxes, groups, weight, bias = case
    out = masked_group_norm(x, groups, mask, weight, bias)
    for b, box in enumerate(boxes):
        crop = x[(slice(b, b + 1), slice(None), *box)]
        inside = out[(slice(b, b + 1), slice(None), *box)]
        torch.testing.assert_close(inside, F.group_norm(crop, groups, weight, bias), atol=1e-5, rtol=1e-5)
        if groups == x.shape[1]:
            torch.testing.assert_close(inside, F.instance_norm(crop, weight=weight, bias=bias), atol=1e-5, rtol=1e-5)


@given(masked_inputs())
def test_masked_layers_ignore_what_the_padding_holds(case):
    """Inside the valid box the outputs of a masked norm or pool do not depend on the padded voxels,
    and the pool is the mean over the box."""
    x, mask, boxes, groups, weight, bias = case
    channels = x.shape[1]
    group = MaskedGroupNorm(groups, channels)
    instance = MaskedInstanceNorm3d(channels, affine=True)
    with torch.no_grad():
        for layer in (group, instance):
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    pool = MaskedAdaptiveAvgPool3d(1)
    other = torch.where(mask, x, torch.randn_like(x) * 50 - 20)
    with valid_voxels(mask):
        for layer in (group, instance, pool):
            a, b = layer(x), layer(other)
            inside = mask.expand_as(a) if layer is not pool else slice(None)
            torch.testing.assert_close(a[inside], b[inside], atol=1e-5, rtol=1e-5)
        pooled = pool(x)
    assert pooled.shape == (x.shape[0], channels, 1, 1, 1)
    for b, box in enumerate(boxes):
        torch.testing.assert_close(pooled[b, :, 0, 0, 0], x[(b, slice(None), *box)].mean(dim=(1, 2, 3)))
    if not bool(mask.all()):  # without the mask the padding does matter
        plain = nn.GroupNorm(groups, channels)
        assert not torch.allclose(plain(x)[mask.expand_as(x)], plain(other)[mask.expand_as(x)], atol=1e-3)


def test_masked_norm_statistics_in_float32_for_half_inputs():
    x = torch.randn(1, 4, 4, 4, 4) * 5 + 100
    mask = _box_mask((1, 1, 4, 4, 4), (slice(0, 2), slice(None), slice(None)))
    half = x.bfloat16()
    out = masked_group_norm(half, 2, mask)
    assert out.dtype == torch.bfloat16
    expected = F.group_norm(half.float()[..., :2, :, :], 2).bfloat16()  # only the output is rounded
    torch.testing.assert_close(out[..., :2, :, :], expected, atol=0.02, rtol=0.01)


def test_mask_like_marks_a_coarse_voxel_valid_when_any_fine_voxel_is():
    fine = torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool)
    fine[0, 0, 5, 2, 7] = True
    fine[0, 0, 0:2, 0:2, 0:2] = True
    with valid_voxels(fine):
        assert torch.equal(mask_like(torch.zeros(1, 3, 8, 8, 8)), fine)
        coarse = mask_like(torch.zeros(3, 5, 4, 4, 4))  # batch 1 broadcast to 3 windows
        assert coarse.shape == (3, 1, 4, 4, 4) and coarse.dtype == torch.bool
        expected = torch.zeros(4, 4, 4, dtype=torch.bool)
        expected[2, 1, 3] = expected[0, 0, 0] = True
        for b in range(3):
            assert torch.equal(coarse[b, 0], expected)
        coarsest = mask_like(torch.zeros(1, 1, 1, 1, 1))
        assert coarsest.shape == (1, 1, 1, 1, 1) and bool(coarsest.all())
        odd = mask_like(torch.zeros(1, 1, 3, 3, 3))  # not a divisor: "any" over the overlapping cells
        cells = [range(i * 8 // 3, -(-(i + 1) * 8 // 3)) for i in range(3)]  # adaptive pooling's cells
        expected = torch.tensor([[[bool(fine[0, 0][cells[i]][:, cells[j]][:, :, cells[k]].any())
                                   for k in range(3)] for j in range(3)] for i in range(3)])
        assert torch.equal(odd[0, 0], expected) and 1 < int(expected.sum()) < 27
        larger = mask_like(torch.zeros(1, 1, 16, 8, 8))  # finer than the mask: nearest neighbour
        assert torch.equal(larger, fine.repeat_interleave(2, dim=2))


def test_valid_voxels_is_reset_after_the_block_and_after_an_exception():
    mask = _box_mask((1, 1, 4, 4, 4), (slice(0, 2), slice(None), slice(None)))
    x = torch.zeros(1, 1, 4, 4, 4)
    assert mask_like(x) is None
    with valid_voxels(mask):
        assert torch.equal(mask_like(x), mask)
        with valid_voxels(None):  # nested blocks restore the outer mask
            assert mask_like(x) is None
        assert torch.equal(mask_like(x), mask)
    assert mask_like(x) is None
    with pytest.raises(RuntimeError, match="boom"):
        with valid_voxels(mask):
            raise RuntimeError("boom")
    assert mask_like(x) is None


def test_valid_voxels_is_not_seen_by_other_threads():
    mask = _box_mask((1, 1, 4, 4, 4), (slice(0, 2), slice(None), slice(None)))
    seen = []
    with valid_voxels(mask):
        thread = threading.Thread(target=lambda: seen.append(mask_like(torch.zeros(1, 1, 4, 4, 4))))
        thread.start()
        thread.join()
    assert seen == [None]


def test_valid_voxels_rejects_a_mask_that_is_not_b1dhw():
    with pytest.raises(ValueError, match=r"\[B, 1, D, H, W\]"):
        with valid_voxels(torch.ones(1, 2, 4, 4, 4, dtype=torch.bool)):
            pass
    with pytest.raises(ValueError):
        with valid_voxels(torch.ones(4, 4, 4, dtype=torch.bool)):
            pass
    assert mn._VALID.get() is None


# ---------------------------------------------------------------------------- the network
@pytest.fixture(scope="module")
def tiny_models():
    """A random-weight MoME and the same weights in a MoME built without the masked layers."""
    from MoMESegmentationLib.model import create_model
    from MoMESegmentationLib.model import mome

    torch.manual_seed(0)
    model = create_model("mome-12", patch_size=(64, 32, 32)).eval()
    original = mome.convert_norms
    mome.convert_norms = lambda module: module  # build one network with PyTorch's own layers
    try:
        torch.manual_seed(1)
        plain = create_model("mome-12", patch_size=(64, 32, 32)).eval()
    finally:
        mome.convert_norms = original
    return model, plain


def test_mome_uses_masked_layers_and_loads_unconverted_checkpoints(tiny_models):
    model, plain = tiny_models
    kinds = {type(m) for m in model.modules()}
    assert {MaskedInstanceNorm3d, MaskedGroupNorm, MaskedAdaptiveAvgPool3d} <= kinds
    assert not kinds & {nn.InstanceNorm3d, nn.GroupNorm}
    assert type(model.global_pool[2]) is MaskedAdaptiveAvgPool3d
    assert not {type(m) for m in plain.modules()} & {MaskedInstanceNorm3d, MaskedGroupNorm, MaskedAdaptiveAvgPool3d}
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)  # both directions, strictly
    model.load_state_dict(plain.state_dict(), strict=True)
    image = torch.rand(1, 1, 64, 32, 32)
    prompts = torch.randn(2, model.config.text_dim)
    with torch.no_grad():
        assert torch.equal(model(image, prompts), plain(image, prompts))


def test_encode_with_an_all_true_mask_equals_encode_without(tiny_models):
    model, _ = tiny_models
    image = torch.rand(2, 1, 64, 32, 32)
    with torch.no_grad():
        reference = model.encode(image)
        for valid in (torch.ones(2, 1, 64, 32, 32, dtype=torch.bool), torch.ones(1, 1, 64, 32, 32)):
            features = model.encode(image, valid)
            assert torch.equal(features.global_feature, reference.global_feature)
            for a, b in zip(features.experts, reference.experts, strict=True):
                assert torch.equal(a, b)


def test_encode_uses_a_partial_mask(tiny_models):
    """A partial mask changes the features; a batch-1 mask applies to every window; the mask is gone
    after the call."""
    model, _ = tiny_models
    image = torch.rand(2, 1, 64, 32, 32)
    # Half the window: the 2x1x1 bottleneck (1/32) has an invalid voxel, so the global pool changes too.
    valid = _box_mask((1, 1, 64, 32, 32), (slice(0, 24), slice(None), slice(None)))
    with torch.no_grad():
        reference = model.encode(image)
        masked = model.encode(image, valid)
        per_window = model.encode(image, valid.expand(2, -1, -1, -1, -1))
        after = model.encode(image)
    assert not torch.allclose(masked.global_feature, reference.global_feature, atol=1e-4)
    assert all(not torch.allclose(a, b, atol=1e-4) for a, b in zip(masked.experts, reference.experts))
    torch.testing.assert_close(per_window.global_feature, masked.global_feature)
    assert torch.equal(after.global_feature, reference.global_feature)
    assert mn._VALID.get() is None


def test_encode_rejects_a_mask_of_the_wrong_shape(tiny_models):
    model, _ = tiny_models
    image = torch.rand(2, 1, 64, 32, 32)
    for shape in [(2, 1, 64, 32, 16), (3, 1, 64, 32, 32), (64, 32, 32), (2, 1, 1, 64, 32, 32)]:
        with pytest.raises(ValueError, match="valid must be"):
            model.encode(image, torch.ones(shape, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid-voxel mask"):  # channel count is checked too
        model.encode(image, torch.ones(2, 2, 64, 32, 32, dtype=torch.bool))
    assert mn._VALID.get() is None
