"""The engine's faster arithmetic agrees with float32 on the bundled CT (accuracy, not speed).

bf16 autocast (``Segmenter(precision="bf16")``, the default on CPUs with native bfloat16) must
give the same structures as float32, each with a Dice of at least 0.99 against the float32 mask. The scan is
segmented in fast mode (2 sliding windows) with the demo prompts, so the module takes seconds.
"""

from __future__ import annotations

import pytest
import torch

from MoMESegmentationLib.engine import PRECISIONS, Segmenter, resolve_precision
from MoMESegmentationLib.errors import MoMEError

MIN_DICE = 0.99


@pytest.fixture(scope="module")
def case():
    from MoMESegmentationLib.data.sample import load_sample_ct

    return load_sample_ct()


def _segment(case, precision: str):
    from MoMESegmentationLib.cli import DEMO_PROMPTS

    segmenter = Segmenter("demo", device="cpu", precision=precision)
    assert segmenter.precision == precision
    return segmenter.segment(case.image, DEMO_PROMPTS, fast=True)


@pytest.fixture(scope="module")
def reference(case):
    return _segment(case, "fp32")


def test_bf16_gives_the_float32_masks(case, reference):
    from MoMESegmentationLib.evaluation import dice

    precision = "bf16"
    result = _segment(case, precision)
    found = {s.id for s in reference.structures if s.found}
    assert len(found) >= 6, "the float32 reference finds most demo structures"
    assert {s.id for s in result.structures if s.found} == found
    scores = {s.id: dice(mask, ref) for s, mask, ref in zip(result.structures, result.masks, reference.masks)
              if s.id in found}
    low = {k: round(v, 4) for k, v in scores.items() if v < MIN_DICE}
    assert not low, f"{precision}: Dice against float32 below {MIN_DICE}: {low}"


def test_precision_choice(monkeypatch):
    import MoMESegmentationLib.engine as engine

    cpu = torch.device("cpu")
    monkeypatch.delenv("MOME_PRECISION", raising=False)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision(None, cpu) == resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
    for name in ("fp32", "bf16"):
        assert resolve_precision(name, cpu) == name
    monkeypatch.setenv("MOME_PRECISION", "bf16")
    assert resolve_precision(None, cpu) == "bf16"
    assert resolve_precision("fp32", cpu) == "fp32"  # the argument wins over the environment
    with pytest.raises(MoMEError, match="needs a CUDA GPU"):
        resolve_precision("fp16", cpu)
    for bad in ("int8", "fp8"):
        with pytest.raises(MoMEError, match="not understood"):
            resolve_precision(bad, cpu)
    assert set(PRECISIONS) == {"auto", "fp32", "bf16", "fp16"}
