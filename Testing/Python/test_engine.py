"""Segmenter: exact output grid, feature cache, cancel, ROI, modality guard and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from engine_fixtures import TINY_STRUCTURES, make_ct, make_tiny_checkpoint, random_rotation
from MoMESegmentationLib.engine import CancelToken, Segmenter, check_ct_like
from MoMESegmentationLib.errors import Cancelled, CheckpointError, InputError, PromptError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def segmenter(checkpoint):
    return Segmenter(checkpoint, device="cpu")


@pytest.mark.parametrize(
    "direction, spacing, shape",
    [
        (np.eye(3), (4.0, 4.0, 4.0), (40, 36, 30)),
        (np.diag([-1.0, 1.0, -1.0]), (3.0, 5.5, 7.0), (37, 41, 23)),  # flips, anisotropic, odd sizes
        (np.eye(3)[:, [2, 0, 1]], (5.0, 4.0, 6.0), (25, 40, 33)),  # permuted axes
        ("oblique", (4.2, 3.9, 6.1), (35, 38, 27)),
    ],
)
def test_output_on_exact_input_grid(segmenter, direction, spacing, shape):
    if isinstance(direction, str):
        direction = random_rotation(np.random.default_rng(3))
    volume = make_ct(shape=shape, spacing=spacing, direction=direction)
    result = segmenter.segment(volume, "liver, spleen")
    assert result.labelmap.shape == volume.shape
    assert result.reference.same_grid(volume)
    assert all(m.shape == volume.shape for m in result.masks)
    labelled = result.labelmap_volume()
    np.testing.assert_array_equal(labelled.direction, volume.direction)
    np.testing.assert_array_equal(labelled.origin, volume.origin)
    np.testing.assert_array_equal(labelled.spacing, volume.spacing)


def test_cached_features_give_same_masks_as_full_run(checkpoint):
    volume = make_ct()
    cached = Segmenter(checkpoint, device="cpu")
    cached.segment(volume, "liver, spleen, left kidney")
    encode_calls = []
    original = cached.model.encode
    cached.model.encode = lambda x: encode_calls.append(1) or original(x)
    second = cached.segment(volume, "right kidney, spleen", probabilities=True)
    assert encode_calls == [], "a new prompt on the same volume must not rerun the backbone"

    fresh = Segmenter(checkpoint, device="cpu", cache_features=False)
    full = fresh.segment(volume, "right kidney, spleen", probabilities=True)
    for a, b in zip(second.probabilities, full.probabilities):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for a, b in zip(second.masks, full.masks):
        np.testing.assert_array_equal(a, b)


def test_cache_is_invalidated_by_a_new_volume(segmenter):
    first = segmenter.segment(make_ct(seed=1), "liver", probabilities=True)
    second = segmenter.segment(make_ct(seed=2), "liver", probabilities=True)
    assert not np.allclose(first.probabilities[0], second.probabilities[0])


def test_cancel_stops_within_one_window(checkpoint):
    segmenter = Segmenter(checkpoint, device="cpu", sw_batch_size=1, cache_features=False)
    volume = make_ct(shape=(60, 60, 60), spacing=(3.0, 3.0, 3.0))
    token = CancelToken()
    windows = []

    def progress(fraction, stage, message):
        if stage == "inference":
            windows.append(message)
            token.cancel()

    with pytest.raises(Cancelled):
        segmenter.segment(volume, "liver", progress=progress, cancel=token)
    assert len(windows) == 1


def test_roi_limits_the_output(segmenter):
    volume = make_ct()
    corner = volume.index_to_physical([5, 5, 5])
    far = volume.index_to_physical([20, 20, 20])
    result = segmenter.segment(volume, "liver", roi=[corner, far], probabilities=True)
    outside = np.ones(volume.shape, bool)
    outside[5:21, 5:21, 5:21] = False
    assert result.probabilities[0][outside].max() == 0.0


def test_small_roi_is_segmented_with_its_surroundings(segmenter):
    """An ROI smaller than a window sees the anatomy around it, not zero padding: here the whole
    volume fits in one window, so inside the ROI the result equals the whole-volume result."""
    volume = make_ct()
    assert max(np.asarray(volume.shape) * volume.spacing) < segmenter.window_extent_mm()
    roi = [volume.index_to_physical([5, 8, 3]), volume.index_to_physical([17, 20, 12])]
    inside = (slice(5, 18), slice(8, 21), slice(3, 13))
    cropped = segmenter.segment(volume, "liver, spleen", roi=roi, probabilities=True)
    whole = segmenter.segment(volume, "liver, spleen", probabilities=True)
    for part, full in zip(cropped.probabilities, whole.probabilities):
        np.testing.assert_allclose(part[inside], full[inside], atol=1e-5)
        assert part.sum() == pytest.approx(part[inside].sum())


def test_group_prompt_expands_and_names_structures(segmenter):
    result = segmenter.segment(make_ct(), "kidneys")
    assert [s.id for s in result.structures] == ["kidney_left", "kidney_right"]
    assert all(s.terminology for s in result.structures)
    assert result.summary()["structures"][0]["color"]


def test_modality_guard_refuses_mr_like_intensities(segmenter):
    volume = make_ct()
    mr = volume.with_array(np.abs(volume.array) + 100.0)
    assert check_ct_like(mr) is not None
    assert check_ct_like(volume) is None
    with pytest.raises(InputError, match="do not look like CT"):
        segmenter.segment(mr, "liver")
    assert segmenter.segment(mr, "liver", anatomy_guard=False).warnings


def test_bad_prompts_and_models(segmenter, checkpoint, tmp_path):
    with pytest.raises(PromptError):
        segmenter.segment(make_ct(), "  , ;  ")
    with pytest.raises(PromptError, match="nearest"):
        segmenter.plan_prompts("pancreas")  # a fixed-vocabulary model does not know it
    with pytest.raises(CheckpointError, match="unknown model"):
        Segmenter("no-such-model", device="cpu")
    with pytest.raises(CheckpointError, match="not found"):
        Segmenter(tmp_path / "missing.safetensors", device="cpu")
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(checkpoint.read_bytes())
    (tmp_path / "tampered.json").write_text(checkpoint.with_suffix(".json").read_text())
    data = bytearray(tampered.read_bytes())
    data[-10] ^= 0xFF
    tampered.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        Segmenter(tampered, device="cpu")


def test_nan_voxels_are_refused(segmenter):
    volume = make_ct()
    volume.array[3, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        segmenter.segment(volume, "liver")


def test_overlaps_go_to_the_higher_probability(segmenter):
    result = segmenter.segment(make_ct(), "liver, spleen", probabilities=True, min_volume_ml=0, min_confidence=0)
    both = result.masks[0] & result.masks[1]
    if both.any():
        higher = np.where(result.probabilities[0] >= result.probabilities[1], 1, 2)
        np.testing.assert_array_equal(result.labelmap[both], higher[both])
    assert set(np.unique(result.labelmap)) <= {0, 1, 2}


def test_structures_known_to_the_model(segmenter):
    assert segmenter.structures == TINY_STRUCTURES
    assert not segmenter.free_text
    assert torch.is_tensor(segmenter.structure_embeddings)


@given(
    shape=st.tuples(*[st.integers(2, 120)] * 3),
    spacing=st.tuples(*[st.floats(0.5, 6.0)] * 3),
    corners=st.tuples(*[st.tuples(st.floats(0, 1), st.floats(0, 1))] * 3),
    extent=st.floats(10.0, 400.0),
)
@settings(max_examples=200, deadline=None)
def test_context_box_holds_the_roi_and_a_window(shape, spacing, corners, extent):
    from MoMESegmentationLib.engine import _context_box
    from MoMESegmentationLib.io.volume import Volume

    volume = Volume(np.zeros(shape, np.float32), spacing=spacing)
    box = []
    for n, (a, b) in zip(shape, corners):
        lo, hi = sorted((int(a * (n - 2)), int(b * (n - 2))))
        box.append(slice(lo, max(hi, lo + 2)))
    context = _context_box(volume, tuple(box), extent)
    for c, b, n, s in zip(context, box, shape, spacing):
        assert 0 <= c.start <= b.start and b.stop <= c.stop <= n
        assert c.stop - c.start >= min(n, np.ceil(extent / s))


def test_fast_mode_resamples_within_the_training_zoom_range(segmenter):
    from MoMESegmentationLib.engine import FAST_SPACING_FACTOR

    assert 1.0 < FAST_SPACING_FACTOR <= 1.2  # the recipes' zoom augmentation reaches +-20 %
    volume = make_ct(shape=(60, 60, 60), spacing=(2.0, 2.0, 2.0))
    normal = segmenter.preprocess(volume).resampled_shape
    fast = segmenter.preprocess(volume, fast=True).resampled_shape
    np.testing.assert_allclose(np.asarray(normal) / np.asarray(fast), FAST_SPACING_FACTOR, rtol=0.05)
    result = segmenter.segment(volume, "liver", fast=True)
    assert result.labelmap.shape == volume.shape
