"""Segmenter on scans thinner than one window: padding, valid-voxel masks, the way back to the input grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_fixtures import make_ct, make_tiny_checkpoint
from MoMESegmentationLib.engine import Segmenter
from MoMESegmentationLib.io.volume import Volume

PATCH = (64, 32, 32)  # the tiny checkpoint's window, RAS axes (axis 2: inferior -> superior)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint trained (so it records) with mirrored padding and valid-voxel masks."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), padding={"mode": "mirror", "mask_valid": True})


def test_padding_follows_the_checkpoint(checkpoint, tmp_path):
    """Mirror + masks only for models trained that way; older checkpoints keep air and unmasked norms."""
    trained = Segmenter(checkpoint, device="cpu")
    assert (trained.pad_mode, trained.mask_padding) == ("mirror", True)
    older = Segmenter(make_tiny_checkpoint(tmp_path), device="cpu")
    assert (older.pad_mode, older.mask_padding) == ("constant", False)
    prep = older.preprocess(make_slab())
    assert prep.padding[2] == (11, 11)
    assert np.all(prep.image[0, 0, :, :, :11].numpy() == 0.0)  # air, as the model was trained


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def segmenter(checkpoint):
    return Segmenter(checkpoint, device="cpu", cache_features=False)


def make_slab(depth: int = 10, shape_xy=(64, 40), seed: int = 0) -> Volume:
    """A slab of a trunk: a body cylinder along z (cut by the first and last slice) holding an organ."""
    rng = np.random.default_rng(seed)
    shape = (*shape_xy, depth)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = x ** 2 + y ** 2 < 0.8
    organ = (x - 0.3) ** 2 + y ** 2 < 0.1 + 0.05 * z
    array = np.where(body, 40.0, -1000.0) + np.where(organ, 60.0, 0.0) + rng.normal(0, 10, shape)
    return Volume(array.astype(np.float32), spacing=(6.0, 6.0, 6.0), origin=(-200.0, 20.0, 300.0),
                  direction=np.eye(3), name="slab")


def unpadded_reference(segmenter: Segmenter, volume: Volume):
    """The same preprocessing without any padding (a 1-voxel window needs none)."""
    patch = segmenter.patch_size
    segmenter.patch_size = (1, 1, 1)
    try:
        return segmenter.preprocess(volume)
    finally:
        segmenter.patch_size = patch


def spy_on_encode(segmenter: Segmenter) -> list:
    """Replace ``model.encode`` by a spy that records each call's window and valid mask, then calls it."""
    calls = []
    original = segmenter.model.encode

    def spy(image, valid=None):
        calls.append((image.detach().clone(), None if valid is None else valid.detach().clone()))
        return original(image, valid)

    segmenter.model.encode = spy
    return calls


def test_thin_slab_is_padded_to_a_window_by_mirroring_the_cut(segmenter):
    volume = make_slab(depth=10)
    prep = segmenter.preprocess(volume)
    reference = unpadded_reference(segmenter, volume)
    real = reference.image[0, 0]
    assert real.shape[2] == 10 and real.shape[0] >= PATCH[0] and real.shape[1] >= PATCH[1]
    assert prep.padding == ((0, 0), (0, 0), (11, 11))
    assert tuple(prep.image.shape[2:]) == (real.shape[0], real.shape[1], PATCH[2])
    assert prep.unpadded == (slice(0, real.shape[0]), slice(0, real.shape[1]), slice(11, 21))
    assert torch.equal(prep.image[0, 0][prep.unpadded], real)  # the body-cropped image, exactly
    assert prep.body_box == reference.body_box and prep.resampled_shape == reference.resampled_shape
    # The field of view cuts the body at both ends of the slab: both sides continue it by reflection.
    image = prep.image[0, 0]
    for k in range(1, 10):
        assert torch.equal(image[..., 11 - k], real[..., k])
        assert torch.equal(image[..., 20 + k], real[..., 9 - k])
    assert prep.fingerprint != reference.fingerprint


def test_slab_whose_body_ends_inside_is_padded_with_air(segmenter):
    volume = make_ct(shape=(76, 44, 8), spacing=(6.0, 6.0, 6.0))  # an ellipsoid: no body on the first/last slice
    prep = segmenter.preprocess(volume)
    real = unpadded_reference(segmenter, volume).image[0, 0]
    (before, after) = prep.padding[2]
    assert before + after + real.shape[2] == PATCH[2] and before > 0
    assert torch.equal(prep.image[0, 0][prep.unpadded], real)
    assert not prep.image[0, 0, :, :, :before].any() and not prep.image[0, 0, :, :, -after:].any()


def test_constant_pad_mode_pads_a_cut_slab_with_air(segmenter):
    segmenter.pad_mode = "constant"
    prep = segmenter.preprocess(make_slab(depth=10))
    assert prep.padding[2] == (11, 11)
    assert not prep.image[0, 0, :, :, :11].any() and not prep.image[0, 0, :, :, 21:].any()
    assert prep.image[0, 0, :, :, 11:21].any()


def test_padded_logits_are_cropped_back_before_returning_to_the_input_grid(segmenter):
    """Whatever the padding holds, the probabilities on the input grid come from the unpadded box."""
    volume = make_slab(depth=10)
    prep = segmenter.preprocess(volume)
    reference = unpadded_reference(segmenter, volume)
    logits = torch.randn(reference.image.shape[2:], generator=torch.Generator().manual_seed(0)) * 4
    padded = torch.full(prep.image.shape[2:], 50.0)
    padded[prep.unpadded] = logits
    expected = segmenter._to_input_grid(logits, reference, volume.shape)
    assert torch.equal(segmenter._to_input_grid(padded, prep, volume.shape), expected)
    assert expected.shape == volume.shape and float(expected.max()) < 1.0  # no padding logit leaked in


def test_thin_slab_windows_get_a_valid_mask_of_the_unpadded_box(segmenter):
    volume = make_slab(depth=10)
    calls = spy_on_encode(segmenter)
    result = segmenter.segment(volume, "liver, spleen", probabilities=True, anatomy_guard=False)
    assert len(calls) == 2  # 1 x 2 x 1 windows over the padded 64 x 40 x 32 image
    expected = torch.zeros(PATCH, dtype=torch.bool)
    expected[:, :, 11:21] = True  # every window spans the whole padded axis 2
    for window, valid in calls:
        assert valid is not None and valid.dtype == torch.bool
        assert valid.shape == (window.shape[0], 1, *PATCH)
        assert torch.equal(valid[0, 0], expected)
    # The result lies on the input grid.
    assert result.labelmap.shape == volume.shape and result.reference.same_grid(volume)
    assert all(m.shape == volume.shape for m in result.masks)
    for p in result.probabilities:
        assert p.shape == volume.shape and np.isfinite(p).all() and 0 <= p.min() and p.max() <= 1

    # Without mask_padding the same windows reach the network unmasked, and the masks made a difference.
    segmenter.mask_padding = False
    calls.clear()
    unmasked = segmenter.segment(volume, "liver, spleen", probabilities=True, anatomy_guard=False)
    assert len(calls) == 2 and all(valid is None for _, valid in calls)
    assert not np.allclose(unmasked.probabilities[0], result.probabilities[0], atol=1e-4)


def test_batched_windows_get_one_mask_per_window(checkpoint):
    segmenter = Segmenter(checkpoint, device="cpu", cache_features=False, sw_batch_size=2)
    calls = spy_on_encode(segmenter)
    prep = segmenter.preprocess(make_slab(depth=10))
    segmenter.predict_logits(prep, segmenter.structure_embeddings[:1])
    assert len(calls) == 1
    window, valid = calls[0]
    assert window.shape[0] == 2 and valid.shape == (2, 1, *PATCH)
    assert bool(valid[..., 11:21].all()) and not valid[..., :11].any() and not valid[..., 21:].any()


def test_scan_larger_than_a_window_gets_no_padding_and_no_mask(segmenter):
    volume = make_slab(depth=40)  # one window along axes 0 and 1, two along axis 2
    prep = segmenter.preprocess(volume)
    assert prep.padding == ((0, 0), (0, 0), (0, 0)) and tuple(prep.image.shape[2:]) == (64, 40, 40)
    assert all(n >= p for n, p in zip(prep.image.shape[2:], PATCH))
    assert torch.equal(prep.image, unpadded_reference(segmenter, volume).image)
    calls = spy_on_encode(segmenter)
    masked = segmenter.segment(volume, "liver", probabilities=True, anatomy_guard=False)
    assert len(calls) == 4 and all(valid is None for _, valid in calls)
    segmenter.mask_padding = False
    unmasked = segmenter.segment(volume, "liver", probabilities=True, anatomy_guard=False)
    np.testing.assert_array_equal(masked.probabilities[0], unmasked.probabilities[0])
    np.testing.assert_array_equal(masked.labelmap, unmasked.labelmap)
