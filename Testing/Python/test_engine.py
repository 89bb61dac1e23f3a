"""Segmenter: feature cache, cancel, ROI, modality guard, bad input, batches, out-of-memory, free text, devices.

The output grid and the rules on the masks are checked with known probabilities in
test_postprocessing.py; here the tiny random-weight model runs the real network where its numbers
matter (batches, the cache), and the fault-injection stub where only the engine's control flow does.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from engine_fixtures import TINY_STRUCTURES, IntensityNetwork, make_ct, make_tiny_checkpoint, never, step
from MoMESegmentationLib.engine import CancelToken, Segmenter, check_ct_like, resolve_device
from MoMESegmentationLib.errors import Cancelled, CheckpointError, InputError, MoMEError, PromptError

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def segmenter(checkpoint):
    return Segmenter(checkpoint, device="cpu")


def test_cached_features_give_same_masks_as_full_run(checkpoint):
    volume = make_ct()
    cached = Segmenter(checkpoint, device="cpu")
    cached.segment(volume, "liver, spleen, left kidney")
    encode_calls = []
    original = cached.model.encode
    cached.model.encode = lambda *args, **kwargs: encode_calls.append(1) or original(*args, **kwargs)
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


def test_using_features_keeps_each_volumes_cache_apart(segmenter):
    """A server swaps one feature cache per session in around each job: A's features survive B's run."""
    from MoMESegmentationLib.engine import FeatureCache

    a, b = make_ct(seed=1), make_ct(seed=2)
    segmenter.segment(a, "liver", anatomy_guard=False)
    own = segmenter.feature_cache
    other = FeatureCache()
    with segmenter.using_features(other):
        assert segmenter.feature_cache is other
        segmenter.segment(b, "liver", anatomy_guard=False)
        assert segmenter.feature_windows["encoded"] > 0 and other.windows
    assert segmenter.feature_cache is own
    segmenter.segment(a, "spleen", anatomy_guard=False)
    assert segmenter.feature_windows == {"encoded": 0, "reused": len(own.windows)}


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


# ------------------------------------------------------------------------------ batches and memory
def _above_threshold(result, threshold=0.5, guard=1e-4):
    """Per structure: (probability >= threshold, voxels far enough from it to compare across runs)."""
    return [(p >= threshold, np.abs(p - threshold) > guard) for p in result.probabilities]


def test_batches_of_windows_give_the_result_of_one_at_a_time(checkpoint, monkeypatch):
    """The random network on two windows of a scan padded to the window (so the valid-voxel masks are
    batched too), one at a time and both at once: same probabilities (to float rounding, far below how
    much they vary over the volume). Larger and ragged batches are in the out-of-memory test."""
    segmenter = Segmenter(checkpoint, device="cpu", cache_features=False)
    volume = make_ct(shape=(20, 40, 16), spacing=(6.0, 6.0, 6.0), seed=7)
    batches = []
    encode = segmenter.model.encode
    monkeypatch.setattr(segmenter.model, "encode", lambda image, *a, **k: batches.append(image.shape[0])
                        or encode(image, *a, **k))
    results = {}
    for size in (1, 2):
        segmenter.sw_batch_size = size
        results[size] = segmenter.segment(volume, "liver, spleen", probabilities=True, anatomy_guard=False)
    assert batches == [1, 1, 2]
    for one, two in zip(results[1].probabilities, results[2].probabilities):
        assert one.std() > 1e-4
        np.testing.assert_allclose(two, one, rtol=0, atol=2e-6)
    for (one, sure), (two, _) in zip(_above_threshold(results[1]), _above_threshold(results[2])):
        np.testing.assert_array_equal(two[sure], one[sure])
    np.testing.assert_array_equal(results[2].labelmap, results[1].labelmap)


@pytest.fixture()
def stub_segmenter(checkpoint):
    return Segmenter(checkpoint, device="cpu")


def test_out_of_memory_retries_with_smaller_batches(stub_segmenter, caplog):
    """CUDA out-of-memory (simulated on the CPU for batches of more than one window) halves the batch
    until it fits; the result is the one of a normal run. Normal runs of 1, 2 and 4 windows per batch
    (six windows: the last batch of four is ragged) agree too; the stub's features are the windows
    themselves, so a window's features filed under another window's key would show."""
    volume = make_ct(shape=(30, 90, 60), spacing=(4.0, 4.0, 4.0))
    rules = {"liver": step(70.0), "spleen": never}
    runs = {}
    for size, batches in ((1, [1] * 6), (2, [2, 2, 2]), (4, [4, 2])):
        stub_segmenter.clear_cache()
        stub_segmenter.model = normal = IntensityNetwork(stub_segmenter, rules)
        stub_segmenter.sw_batch_size = size
        runs[size] = stub_segmenter.segment(volume, "liver, spleen", probabilities=True, anatomy_guard=False)
        assert normal.encoded == normal.decoded == batches
    expected = runs[1]
    assert expected.structures[0].found and 0 < expected.masks[0].mean() < 0.5
    for size in (2, 4):
        for a, b in zip(runs[size].probabilities, expected.probabilities):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(runs[size].labelmap, expected.labelmap)

    stub_segmenter.clear_cache()
    stub_segmenter.model = tight = IntensityNetwork(stub_segmenter, rules, oom_above=1)
    stub_segmenter.sw_batch_size = 4
    with caplog.at_level("WARNING", logger="MoMESegmentationLib.engine"):
        result = stub_segmenter.segment(volume, "liver, spleen", probabilities=True, anatomy_guard=False)
    assert tight.encoded == [4, 2] + [1] * 6
    retries = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(retries) == 2 and "2 window(s)" in retries[0] and "1 window(s)" in retries[1]
    for a, b in zip(result.probabilities, expected.probabilities):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(result.labelmap, expected.labelmap)
    assert [s.to_json() for s in result.structures] == [s.to_json() for s in expected.structures]

    # Out of memory even for one window at a time: a clear error, not an endless loop.
    stub_segmenter.clear_cache()
    stub_segmenter.model = IntensityNetwork(stub_segmenter, rules, oom_above=0)
    with pytest.raises(MoMEError, match="out of GPU memory even with one window"):
        stub_segmenter.segment(volume, "liver", anatomy_guard=False)


# ------------------------------------------------------------------------------------------- cancel
def test_cancel_during_postprocessing_keeps_a_valid_feature_cache(segmenter, monkeypatch):
    volume = make_ct(seed=11)
    token = CancelToken()
    stages = []

    def progress(fraction, stage, message):
        stages.append(stage)
        if stage == "postprocessing":
            token.cancel()

    with pytest.raises(Cancelled):
        segmenter.segment(volume, "liver, spleen", probabilities=True, anatomy_guard=False,
                          progress=progress, cancel=token)
    assert "inference" in stages and stages[-1] == "postprocessing"

    encoded = []
    encode = segmenter.model.encode
    monkeypatch.setattr(segmenter.model, "encode", lambda *a, **k: encoded.append(1) or encode(*a, **k))
    again = segmenter.segment(volume, "liver, spleen", probabilities=True, anatomy_guard=False)
    assert encoded == [], "the features computed before the cancel must be reused"
    segmenter.clear_cache()
    fresh = segmenter.segment(volume, "liver, spleen", probabilities=True, anatomy_guard=False)
    assert encoded == [1]
    for a, b in zip(again.probabilities, fresh.probabilities):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_array_equal(again.labelmap, fresh.labelmap)


# ---------------------------------------------------------------------------------------- free text
@pytest.fixture(scope="module")
def free_text_segmenter(tmp_path_factory):
    return Segmenter(make_tiny_checkpoint(tmp_path_factory.mktemp("free"), free_text=True), device="cpu")


def test_free_text_prompt_reaches_the_network_as_its_own_embedding(free_text_segmenter, monkeypatch):
    """A prompt that names no structure is matched to the nearest one for its name and colour, but the
    heads get the prompt's own text embedding (a model with a text encoder segments what was typed)."""
    segmenter = free_text_segmenter
    stub = IntensityNetwork(segmenter, {"spleen": never, None: step(70.0)})
    monkeypatch.setattr(segmenter, "model", stub)
    result = segmenter.segment(make_ct(), "spleen, kidney stone", anatomy_guard=False)

    typed = segmenter.text_encoder.encode(["kidney stone"]).float().cpu()[0]
    similarities = torch.nn.functional.cosine_similarity(typed[None], segmenter.structure_embeddings, dim=-1)
    nearest = TINY_STRUCTURES[int(similarities.argmax())]
    sent = stub.embeddings[-1]
    torch.testing.assert_close(sent[0], segmenter.structure_embeddings[TINY_STRUCTURES.index("spleen")])
    torch.testing.assert_close(sent[1], typed)
    assert not torch.allclose(sent[1], segmenter.structure_embeddings[TINY_STRUCTURES.index(nearest)])

    spleen, stone = result.structures
    assert spleen.found is False and spleen.rule == "empty"
    assert stone.found and stone.name == "kidney stone" and stone.prompt == "kidney stone"
    assert stone.match == stone.id == nearest
    assert stone.similarity == pytest.approx(float(similarities.max()), abs=1e-5) and stone.similarity < 0.99
    assert stone.terminology is None
    assert set(np.unique(result.labelmap)) == {0, 2}


# ------------------------------------------------------------------------------------------ devices
def test_device_resolution_without_a_gpu(checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for device in ("cuda", "cuda:0"):
        with pytest.raises(MoMEError, match="no CUDA GPU is available"):
            resolve_device(device)
    with pytest.raises(MoMEError, match="not understood"):
        resolve_device("gpu")
    with pytest.raises(MoMEError, match="no CUDA GPU is available"):
        Segmenter(checkpoint, device="cuda")
    cpu = Segmenter(checkpoint, device="auto")
    assert cpu.device == torch.device("cpu") and cpu._choose_batch() == 1
    assert cpu.model_info()["device"] == "cpu"


def test_device_resolution_with_too_few_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(MoMEError, match="does not exist: 1 CUDA GPU"):
        resolve_device("cuda:1")


@pytest.mark.gpu
@requires_cuda
def test_gpu_in_float32_gives_the_cpu_result(checkpoint, segmenter, monkeypatch):
    """The random network on the GPU (GPU stitching and post-processing) against the CPU, both in
    float32: autocast and TF32 are switched off so that only the device differs. The engine's own
    half precision is run with known probabilities in test_postprocessing.py."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gpu = Segmenter(checkpoint, device="cuda")
        assert gpu.device.type == "cuda" and gpu._choose_batch() >= 1
        monkeypatch.setattr(gpu, "_autocast", lambda: torch.autocast("cuda", enabled=False))
        volume = make_ct(shape=(20, 40, 16), spacing=(6.0, 6.0, 6.0), seed=7)
        on_gpu = gpu.segment(volume, "liver, spleen", probabilities=True, anatomy_guard=False)
        on_cpu = segmenter.segment(volume, "liver, spleen", probabilities=True, anatomy_guard=False)
        for a, b in zip(on_gpu.probabilities, on_cpu.probabilities):
            assert a.dtype == np.float32 and b.std() > 1e-4
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        for (a, sure), (b, _) in zip(_above_threshold(on_cpu), _above_threshold(on_gpu)):
            np.testing.assert_array_equal(b[sure], a[sure])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    for a, b in zip(on_gpu.structures, on_cpu.structures):
        assert (a.found, a.rule) == (b.found, b.rule)
        assert a.mean_probability == pytest.approx(b.mean_probability, abs=1e-5)


@pytest.mark.gpu
@requires_cuda
def test_gpu_out_of_memory_falls_back_to_smaller_batches_and_cpu_stitching(checkpoint):
    volume = make_ct(shape=(30, 90, 60), spacing=(4.0, 4.0, 4.0))
    rules = {"liver": step(70.0), "spleen": never}
    gpu = Segmenter(checkpoint, device="cuda", sw_batch_size=1)
    gpu.model = IntensityNetwork(gpu, rules)
    expected = gpu.segment(volume, "liver, spleen", probabilities=True, anatomy_guard=False)
    gpu.clear_cache()
    gpu.sw_batch_size = 4
    gpu.model = tight = IntensityNetwork(gpu, rules, oom_above=1)
    result = gpu.segment(volume, "liver, spleen", probabilities=True, anatomy_guard=False)
    assert tight.encoded == [4, 2] + [1] * 6 and expected.structures[0].found
    for a, b in zip(result.probabilities, expected.probabilities):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_array_equal(result.labelmap, expected.labelmap)
