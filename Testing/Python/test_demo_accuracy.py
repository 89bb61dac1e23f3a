"""Accuracy regression of the bundled demo weights on the bundled real CT.

The floors live in one place, ``data/demo_accuracy_floors.json``: the Dice measured with these
exact weights (``--fast``, the demo prompts) minus a margin. The file names the weights' SHA-256,
so new weights cannot land without new floors: measure them with

    scripts/venv-run python Testing/Python/test_demo_accuracy.py

and commit the file together with the weights. The reference labels are TotalSegmentator's
predictions and the scan was in the demo's training data: this guards against regressions of the
pipeline (preprocessing, windows, post-processing, geometry), not accuracy on unseen patients.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FLOORS = Path(__file__).parent / "data" / "demo_accuracy_floors.json"
#: Dice below the measured value that still passes (CPU thread counts change sums in the last bits).
MARGIN = 0.03


def measure() -> tuple[dict[str, float], str]:
    from MoMESegmentationLib.cli import DEMO_PROMPTS
    from MoMESegmentationLib.data.sample import load_sample_ct
    from MoMESegmentationLib.engine import Segmenter
    from MoMESegmentationLib.evaluation import dice_per_structure

    case = load_sample_ct()
    segmenter = Segmenter("demo", device="cpu")
    result = segmenter.segment(case.image, DEMO_PROMPTS, fast=True)
    return dice_per_structure(result, case.labels.array, case.label_table), segmenter.model_info()["sha256"]


@pytest.fixture(scope="module")
def measured():
    return measure()


def test_floors_belong_to_the_bundled_weights(measured):
    _, sha256 = measured
    recorded = json.loads(FLOORS.read_text())
    assert recorded["sha256"] == sha256, (
        "the demo weights changed: re-measure the floors (python Testing/Python/test_demo_accuracy.py) "
        "and commit them with the weights")


def test_dice_at_or_above_the_floors(measured):
    dice, _ = measured
    floors = json.loads(FLOORS.read_text())["floors"]
    assert set(floors) == set(dice)
    below = {name: (round(dice[name], 3), floor) for name, floor in floors.items() if dice[name] < floor}
    assert not below, f"Dice below the floor (measured, floor): {below}"


if __name__ == "__main__":
    dice, sha256 = measure()
    FLOORS.write_text(json.dumps({
        "what": "Dice of the demo weights on the bundled CT (mome segment --fast, the demo prompts) against its "
                "bundled reference labels; floors = measured - margin",
        "sha256": sha256,
        "margin": MARGIN,
        "measured": {k: round(v, 4) for k, v in sorted(dice.items())},
        "floors": {k: round(max(0.0, v - MARGIN), 3) for k, v in sorted(dice.items())},
    }, indent=1) + "\n")
    print(FLOORS.read_text())
