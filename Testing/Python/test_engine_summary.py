"""What a segmentation reports besides its masks: the summary, the progress and the intensity warnings.

The Slicer panel, the worker protocol and the JSON summary all read these fields, so each is
checked for its value, not only its presence. The network is the fault-injection stub
:class:`engine_fixtures.IntensityNetwork`, so which structures are found is known in advance.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from engine_fixtures import ORGAN_HU, IntensityNetwork, make_phantom, make_tiny_checkpoint, never, step
from MoMESegmentationLib.engine import Segmenter, check_ct_like
from MoMESegmentationLib.io.volume import Volume

LEVEL = 75.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), spacing=3.0)


@pytest.fixture
def run(checkpoint):  # function scope: see test_montage.py's fixture
    segmenter = Segmenter(checkpoint, device="cpu")
    segmenter.model = IntensityNetwork(segmenter, {"liver": step(LEVEL), "kidney_left": step(LEVEL),
                                                   "spleen": never})
    volume = make_phantom((30, 30, 30), (4.0, 4.0, 4.0), boxes=[((-20, -20, -20), (20, 20, 20), ORGAN_HU)])
    events = []
    started = time.perf_counter()
    result = segmenter.segment(volume, "liver, left kidney, spleen", anatomy_guard=False,
                               progress=lambda fraction, stage, message: events.append((fraction, stage, message)))
    result.wall_s = time.perf_counter() - started
    return segmenter, result, events


def test_summary_names_the_model_and_what_each_prompt_became(run, checkpoint):
    _, result, _ = run
    summary = result.summary()
    assert summary["model"]["name"] == str(checkpoint)
    assert summary["model"]["device"] == "cpu"
    assert [(s["prompt"], s["id"], s["found"]) for s in summary["structures"]] == [
        ("liver", "liver", True), ("left kidney", "kidney_left", True), ("spleen", "spleen", False)]
    assert summary["prompts"] == ["liver", "left kidney", "spleen"]
    assert summary["anatomy_guard"] is False and summary["coverage"] is None
    timings = summary["timings_s"]
    assert set(timings) == {"preprocess", "inference", "postprocess", "total"}
    assert all(value >= 0 for value in timings.values())
    assert timings["inference"] <= timings["total"] <= result.wall_s + 1e-3


def test_progress_rises_to_done_with_the_count_found(run):
    _, _, events = run
    fractions = [fraction for fraction, _, _ in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert events[-1][1:] == ("done", "2 of 3 structures found")


def test_intensity_warnings_say_when_results_will_be_unreliable():
    rng = np.random.default_rng(0)
    ct = Volume(rng.uniform(-1000, 400, (20, 20, 20)).astype(np.float32), name="ct")
    assert check_ct_like(ct) is None
    mr = Volume(rng.uniform(0, 800, (20, 20, 20)).astype(np.float32), name="mr")
    assert check_ct_like(mr).startswith("mr: intensities do not look like CT")
    assert check_ct_like(mr).endswith("Results will be unreliable.")
    odd = Volume(np.concatenate([rng.uniform(-1000, 400, 7000), rng.uniform(20000, 30000, 1000)])
                 .reshape(20, 20, 20).astype(np.float32), name="odd")
    warning = check_ct_like(odd)
    assert warning.startswith("odd: intensity range") and "unreliable" not in warning  # advisory only
