"""The router's maps (``mome segment --explain``): they are the router's gates, on the input's grid.

A tiny random-weight model makes gates that vary from voxel to voxel, so the maps can be compared
with the gates a forward hook on the router captures. The demo weights on the bundled CT check that
explaining changes no voxel of a real segmentation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from engine_fixtures import grid_centres, in_box, make_ct, make_tiny_checkpoint, random_rotation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MoMESegmentationLib.cli import main
from MoMESegmentationLib.engine import Segmenter
from MoMESegmentationLib.explain import border_band, gate_maps
from MoMESegmentationLib.io.readers import read_volume, write_volume
from MoMESegmentationLib.io.volume import Volume
from MoMESegmentationLib.model.router import TextGuidedRouter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = "liver, spleen"


def sharpen(segmenter: Segmenter, factor: float = 30.0) -> Segmenter:
    """Scale the router's last layer: random weights give gates of nearly 1/E everywhere, whose ties
    would make the dominant expert a coin toss; sharper gates make every map worth comparing."""
    with torch.no_grad():
        segmenter.model.router.gate.weight.mul_(factor)
        segmenter.model.router.gate.bias.mul_(factor)
    return segmenter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("explain-model")
    return sharpen(Segmenter(make_tiny_checkpoint(folder), "cpu", precision="fp32"))


def model_grid_volume(shape=(64, 32, 32), spacing=6.0, seed=0) -> Volume:
    """A volume already on the tiny model's grid: RAS voxel axes, its spacing, one window, all body."""
    rng = np.random.default_rng(seed)
    array = rng.normal(40.0, 60.0, shape).astype(np.float32)  # soft tissue: the body crop keeps everything
    return Volume(array, spacing=(spacing,) * 3, origin=(0.0, 0.0, 0.0), direction=np.diag([-1.0, -1.0, 1.0]),
                  name="model-grid")


def entropy_of(gates: np.ndarray) -> np.ndarray:
    g = np.clip(gates, 1e-6, None)
    return -(gates * np.log(g)).sum(axis=0) / np.log(gates.shape[0])


# ------------------------------------------------------------------------- the maps are the gates
def test_maps_equal_the_router_gates_captured_by_a_forward_hook(tiny):
    volume = model_grid_volume()
    captured = []
    handle = tiny.model.router.register_forward_hook(lambda module, args, out: captured.append(out[0].detach().clone()))
    try:
        result = tiny.segment(volume, PROMPTS, anatomy_guard=False, explain=True)
    finally:
        handle.remove()
    assert len(captured) == 1, "one window, one chunk of prompts: the router ran once"
    gates = captured[0][0].float().numpy()  # [K, E, D, H, W] in RAS order = the volume's voxel order
    assert gates.shape[:2] == (2, 5) and gates.shape[2:] == volume.shape
    explanation = result.explanation
    for k in range(2):
        g = gates[k]
        top2 = np.sort(g, axis=0)[-2:]
        clear = (top2[1] - top2[0]) > 1e-5  # no near-ties, where float rounding may pick either expert
        assert clear.mean() > 0.95
        np.testing.assert_array_equal(explanation.dominant[k][clear], (np.argmax(g, axis=0) + 1)[clear])
        np.testing.assert_allclose(explanation.entropy[k], entropy_of(g), atol=1e-4)
        # The summary's mean gates inside the mask are the hooked gates averaged over that mask.
        mask = result.masks[k] if result.structures[k].found else None
        routing = explanation.routing[k]
        if mask is not None and mask.any():
            np.testing.assert_allclose(routing.inside, g[:, mask].mean(axis=1), atol=1e-4)
    # The gates vary: a map of one colour would pass the comparison above without showing anything.
    assert len(np.unique(explanation.dominant[0])) >= 3
    assert explanation.entropy[0].std() > 0.01


def test_summary_mean_gates_inside_and_at_the_border_match_the_gates(tiny):
    """Inside an ROI the masks end at the ROI's faces: their inside and border means, recomputed from
    the hooked gates (the band's voxels outside the ROI have no gates and do not count)."""
    volume = model_grid_volume(seed=1)
    captured = []
    handle = tiny.model.router.register_forward_hook(
        lambda module, args, out: captured.append(out[0].detach().clone()))
    roi_index = (slice(10, 50), slice(6, 26), slice(5, 27))
    corners = np.array([[10, 6, 5], [49, 25, 26]], float)
    points = volume.index_to_physical(corners)
    roi = [(points.min(axis=0) - 1.0).tolist(), (points.max(axis=0) + 1.0).tolist()]
    try:
        result = tiny.segment(volume, "liver, spleen, left kidney, right kidney", roi=roi, anatomy_guard=False,
                              explain=True, min_confidence=0.0, min_volume_ml=0.0)
    finally:
        handle.remove()
    computed = np.zeros(volume.shape, bool)
    computed[roi_index] = True
    checked = 0
    for k, structure in enumerate(result.structures):
        mask = result.masks[k]
        if not mask.any():
            continue
        assert not (mask & ~computed).any()
        g = captured[0][0, k].float().numpy()
        routing = result.explanation.routing[k]
        np.testing.assert_allclose(routing.inside, g[:, mask].mean(axis=1), atol=1e-4)
        band = border_band(mask) & computed
        np.testing.assert_allclose(routing.border, g[:, band].mean(axis=1), atol=1e-4)
        entry = result.summary()["structures"][k]["routing"]
        assert set(entry["inside"]) == {x.name for x in result.explanation.experts}
        assert entry["border_voxels"] == int(band.sum()) > 0
        assert entry["dominant"] == result.explanation.experts[int(np.argmax(g[:, mask].mean(axis=1)))].name
        checked += 1
    assert checked >= 1, "the random model found none of the four structures"


def test_border_band_is_every_voxel_within_two_steps_of_the_surface():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    mask = np.zeros((24, 20, 18), bool)
    mask[5:17, 4:15, 6:13] = True
    mask[9:12, 8:11, 3:7] = True  # a bump
    mask &= rng.random(mask.shape) > 0.02  # a few holes
    taxicab_out = ndimage.distance_transform_cdt(~mask, metric="taxicab")  # steps to the mask
    taxicab_in = ndimage.distance_transform_cdt(mask, metric="taxicab")  # steps to the background
    expected = (~mask & (taxicab_out <= 2)) | (mask & (taxicab_in <= 2))
    np.testing.assert_array_equal(border_band(mask, 2), expected)
    assert not border_band(np.zeros((4, 4, 4), bool)).any()


# ------------------------------------------------------------------------- gates: soft and top-k
def router_gates(top_k):
    torch.manual_seed(0)
    router = TextGuidedRouter(num_experts=5, expert_channels=4, text_channels=6, hidden=8, top_k=top_k)
    experts = [torch.randn(2, 4, 16 // 2 ** s, 16 // 2 ** s, 16 // 2 ** s) for s in range(5)]
    descriptors = router.descriptors(experts, (8, 8, 8))
    gates, probs, _ = router(descriptors, torch.randn(2, 3, 6), (16, 16, 16))
    return gates, probs


def test_soft_gates_sum_to_one_at_every_voxel():
    gates, probs = router_gates(None)
    torch.testing.assert_close(gates.sum(dim=2), torch.ones_like(gates[:, :, 0]))
    assert torch.equal(gates, probs)
    assert (gates > 0).all()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_keeps_the_k_largest_gates_and_zeroes_the_rest(k):
    gates, probs = router_gates(k)
    kept = gates > 0
    assert (kept.sum(dim=2) == k).all()
    torch.testing.assert_close(gates.sum(dim=2), torch.ones_like(gates[:, :, 0]))
    # The kept experts are the k most probable ones, renormalised.
    threshold = probs.topk(k, dim=2).values[:, :, -1:]
    assert torch.equal(kept, probs >= threshold)
    torch.testing.assert_close(gates, torch.where(kept, probs / (probs * kept).sum(dim=2, keepdim=True), 0.0))


def test_a_top_1_model_shows_one_expert_per_voxel_with_zero_entropy(tmp_path):
    segmenter = sharpen(Segmenter(make_tiny_checkpoint(tmp_path, top_k=1, name="top1"), "cpu", precision="fp32"))
    result = segmenter.segment(model_grid_volume(), PROMPTS, anatomy_guard=False, explain=True)
    for dominant, entropy in zip(result.explanation.dominant, result.explanation.entropy):
        assert (dominant > 0).all()
        assert float(entropy.max()) < 1e-4
    assert len(np.unique(result.explanation.dominant[0])) >= 2  # not one expert everywhere


def test_gate_maps_mark_voxels_that_were_not_computed():
    gates = np.zeros((3, 2, 2, 1), np.float32)
    gates[:, 0, 0, 0] = (0.2, 0.7, 0.1)
    gates[:, 0, 1, 0] = (1 / 3, 1 / 3, 1 / 3)
    gates[:, 1, 0, 0] = (0.1, 0.1, 0.1)  # interpolated at the body's edge: mostly outside
    dominant, entropy, computed = gate_maps(gates)
    assert dominant.tolist() == [[[2], [1]], [[0], [0]]]
    assert computed.tolist() == [[[True], [True]], [[False], [False]]]
    assert entropy[0, 1, 0] == pytest.approx(1.0, abs=1e-5) and entropy[1, 0, 0] == 0.0


# ------------------------------------------------------------------------- geometry
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), flip=st.sampled_from([(1, 1, 1), (-1, 1, 1), (1, -1, -1)]))
def test_maps_land_on_the_input_grid_of_an_oblique_volume(tiny, seed, flip):
    """An oblique, anisotropic, flipped volume with an ROI: the maps have its grid, and they are
    computed exactly where the engine segments (the voxels that touch the ROI), nowhere else."""
    rng = np.random.default_rng(seed)
    direction = random_rotation(rng) * np.asarray(flip, float)[None, :]
    ct = make_ct(shape=(34, 30, 26), spacing=(3.5, 4.0, 5.0), direction=direction, seed=seed)
    ct = Volume(np.full(ct.shape, 40.0, np.float32) + ct.array * 0.01, ct.spacing, ct.origin, ct.direction,
                name="oblique")
    points = grid_centres(ct.shape, ct.spacing, ct.origin, ct.direction)
    centre = points.reshape(-1, 3).mean(axis=0)
    low, high = centre - 25.0, centre + 25.0
    result = tiny.segment(ct, PROMPTS, roi=[low.tolist(), high.tolist()], anatomy_guard=False, explain=True)
    half = 0.5 * np.abs(ct.direction) @ np.asarray(ct.spacing)
    surely_in = in_box(points, low, high, margin=-float(half.max()))
    surely_out = ~in_box(points, low, high, margin=float(half.max()) + 1e-3)
    for dominant, entropy in zip(result.explanation.dominant, result.explanation.entropy):
        assert dominant.shape == ct.shape and entropy.shape == ct.shape
        assert (dominant[surely_in] > 0).all()
        assert (dominant[surely_out] == 0).all() and (entropy[surely_out] == 0).all()


def test_written_maps_keep_the_input_geometry(tiny, tmp_path):
    ct = make_ct(shape=(30, 28, 24), spacing=(3.0, 3.5, 5.0), direction=random_rotation(np.random.default_rng(7)))
    source = tmp_path / "ct.nii.gz"
    write_volume(ct, source)
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(source), "-p", PROMPTS, "-o", str(out), "--model", str(tiny.checkpoint_path),
                 "--device", "cpu", "--no-anatomy-guard", "--explain", "--quiet"]) == 0
    summary = json.loads((tmp_path / "seg.json").read_text())
    maps = summary["explain"]["maps"]
    assert summary["explain"]["num_experts"] == 5
    assert [e["name"] for e in summary["explain"]["experts"]][-1] == "1/16 scale (deepest)"
    assert sorted(maps["structures"]) == ["1", "2"]
    reference = read_volume(source)
    for label, files in maps["structures"].items():
        for kind in ("dominant", "entropy"):
            written = read_volume(tmp_path / files[kind])
            assert written.shape == reference.shape
            np.testing.assert_allclose(written.spacing, reference.spacing, atol=1e-5)
            np.testing.assert_allclose(written.origin, reference.origin, atol=1e-4)
            np.testing.assert_allclose(written.direction, reference.direction, atol=1e-5)
        labels = read_volume(tmp_path / files["dominant"]).array
        assert set(np.unique(labels)) <= set(range(6))
        entry = summary["structures"][int(label) - 1]["routing"]
        assert entry is not None and set(entry) >= {"inside", "border", "dominant"}
    table = (tmp_path / maps["color_table"]).read_text().splitlines()
    assert "5 1/16_scale_(deepest) 68 1 84 255" in table


# ------------------------------------------------------------------------- one expert: nothing to show
def test_a_single_expert_model_says_so_and_writes_nothing(tmp_path, capsys):
    checkpoint = make_tiny_checkpoint(tmp_path, expert_scales=(0,), name="single")
    source = tmp_path / "ct.nii.gz"
    write_volume(make_ct(), source)
    out = tmp_path / "seg.nii.gz"
    plain = tmp_path / "plain.nii.gz"
    common = ["--model", str(checkpoint), "--device", "cpu", "--no-anatomy-guard", "--quiet"]
    assert main(["segment", str(source), "-p", PROMPTS, "-o", str(plain), *common]) == 0
    assert main(["segment", str(source), "-p", PROMPTS, "-o", str(out), "--explain", *common]) == 0
    err = capsys.readouterr().err
    assert "one expert" in err
    assert not (tmp_path / "seg_experts").exists()
    summary = json.loads((tmp_path / "seg.json").read_text())
    assert summary["explain"]["num_experts"] == 1 and summary["explain"]["maps"] is None
    assert "one expert" in summary["explain"]["note"]
    np.testing.assert_array_equal(read_volume(out).array, read_volume(plain).array)


# ------------------------------------------------------------------------- real weights, real CT
@pytest.mark.slow
def test_explain_does_not_change_the_demo_segmentation_by_one_voxel():
    from MoMESegmentationLib.data.sample import load_sample_ct

    ct = load_sample_ct().image
    segmenter = Segmenter("demo", "cpu", threads=2)
    prompts = "liver, aorta, left kidney"
    plain = segmenter.segment(ct, prompts, fast=True)
    explained = segmenter.segment(ct, prompts, fast=True, explain=True)
    assert explained.feature_windows["encoded"] == 0, "the second run reuses the image features"
    assert sum(s.found for s in plain.structures) >= 2
    for a, b in zip(plain.masks, explained.masks):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(plain.labelmap, explained.labelmap)
    assert [s.to_json() for s in plain.structures] == \
        [{k: v for k, v in s.items() if k != "routing"} for s in explained.summary()["structures"]]
    # Every found structure has its routing, and the maps cover the scan's body.
    for structure, routing, dominant in zip(explained.structures, explained.explanation.routing,
                                            explained.explanation.dominant):
        if structure.found:
            assert routing.inside is not None and abs(sum(routing.inside) - 1.0) < 1e-3
            assert (dominant[explained.masks[structure.label - 1]] > 0).all()


def test_without_explain_no_gates_are_asked_for_or_kept(tiny):
    """Off by default, the routing maps cost nothing: decode is never asked for the gates."""
    asked = []
    original = tiny.model.decode

    def decode(*args, **kwargs):
        asked.append(bool(kwargs.get("return_gates")))
        return original(*args, **kwargs)

    tiny.model.decode = decode
    try:
        plain = tiny.segment(model_grid_volume(), PROMPTS, anatomy_guard=False)
        assert asked and not any(asked)
        assert plain.explanation is None and "explain" not in plain.summary()
        assert all("routing" not in s for s in plain.summary()["structures"])
        explained = tiny.segment(model_grid_volume(), PROMPTS, anatomy_guard=False, explain=True)
        assert asked[-1] is True and explained.explanation is not None
    finally:
        del tiny.model.decode
