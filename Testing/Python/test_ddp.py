"""DDP on the CPU: two gloo ranks started with torchrun, compared with one process.

One torchrun launch (``ddp_worker.py``) runs, in order and each with a fresh trainer:

* ``straight``: N steps with periodic validation;
* ``first``: the same config in another folder, stopped after step k;
* ``resumed``: that folder resumed to step N;
* ``grown``: a resume, on two ranks, of a state that one process wrote (expected to be refused).

Beforehand the test trains the one-process run that has the same global batch (1 process x batch 2
against 2 ranks x batch 1): both draw the same sample keys at every step (see ``StepSampler``).
The loss is BCE only (Dice and router-balance weights 0), because BCE is a mean over every prompt
of every sample (each sample has the same number of weighted prompts), so the batch-2 gradient
is exactly the average of the two ranks' gradients, which DDP computes. Soft Dice is normalised
by the number of non-empty prompts in the batch and the balancing loss by batch-wide expert
loads, so with those terms the two runs minimise different functions and are not comparable.
Gradient clipping is off, so the gradients are compared unscaled.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
pytest.importorskip("MoMESegmentationLib.data.phantoms")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from ddp_worker import REPO_ROOT, KeyRecorder, make_embedding_cache, tiny_config_dict  # noqa: E402

from MoMESegmentationLib.errors import MoMEError  # noqa: E402
from MoMESegmentationLib.training.config import config_from_dict  # noqa: E402
from MoMESegmentationLib.training.trainer import Trainer  # noqa: E402

WORKER = Path(__file__).with_name("ddp_worker.py")
STRUCTURES = ["liver", "spleen", "kidney_left", "kidney_right"]
STEPS, STOP_AT, VAL_EVERY = 3, 1, 2
RANKS = (0, 1)
PHASES = ("straight", "first", "resumed", "grown")

# Tolerances. Measured on this config: the step-1 gradients of 2 ranks and of 1 process differ by
# 9e-5 (relative L2), exactly what batch-2 convolutions differ from two batch-1 ones by in one
# process (float32 summation order; DDP's averaging adds nothing measurable). Gradients of other
# samples, or a sum instead of a mean over ranks, differ by ~1. AdamW turns a 1e-4 gradient
# difference into sign flips of the smallest components, so after 3 steps the weight updates
# differ by 7% (cosine 0.998), against 140% (cosine -0.02) for a run on other samples.
GRADIENT_TOLERANCE = 1e-3
MIN_UPDATE_COSINE = 0.95
MAX_UPDATE_DISTANCE = 0.3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(root: Path, name: str, cache: Path, batch_size: int, validation: int) -> Path:
    raw = tiny_config_dict(
        root / name, cache,
        schedule={"max_steps": STEPS, "warmup_steps": 1, "checkpoint_every": 1, "val_every": VAL_EVERY,
                  "batch_size": batch_size},
        logging={"log_every": 1, "plot": False, "progress": False},
        optim={"dice_weight": 0.0, "balance_weight": 0.0, "grad_clip": 0.0},
        transforms={"patch_size": [64, 32, 32]},
        data={"datasets": [{"kind": "phantoms", "name": "phantoms", "n": 4, "seed": 0, "spacing_range": [6.0, 6.0],
                            "random_orientation": True}],
              "validation": {"phantoms": validation, "phantom_seed": 100000, "sw_batch_size": 1, "overlap": 0.0}},
    )
    path = root / f"{name}.json"
    path.write_text(json.dumps(raw))
    return path


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _model_state(run: Path) -> dict:
    from safetensors.torch import load_file

    return {k[len("model."):]: v for k, v in load_file(str(run / "resume" / "state.safetensors")).items()
            if k.startswith("model.")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    cache = make_embedding_cache(root / "embeddings.safetensors", STRUCTURES)
    configs = {
        "two_ranks": _config(root, "straight", cache, batch_size=1, validation=1),
        "interrupted": _config(root, "interrupted", cache, batch_size=1, validation=1),
        "one_process": _config(root, "one_process", cache, batch_size=2, validation=0),
    }
    # 1 process x batch 2, one thread like each rank.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = config_from_dict(json.loads(configs["one_process"].read_text()))
        with KeyRecorder() as recorder:
            Trainer(config, device="cpu", stop_step=STOP_AT).fit()
            shutil.copy(root / "one_process" / "resume" / "state.safetensors", root / "one_process.state.safetensors")
            Trainer(config, device="cpu", resume=True).fit()
    finally:
        torch.set_num_threads(threads)

    plan = {"out": str(root), "phases": [
        {"name": "straight", "config": str(configs["two_ranks"])},
        {"name": "first", "config": str(configs["interrupted"]), "stop_step": STOP_AT},
        {"name": "resumed", "config": str(configs["interrupted"]), "resume": True},
        {"name": "grown", "config": str(configs["one_process"]), "resume": True, "refused": True},
    ]}
    (root / "plan.json").write_text(json.dumps(plan))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(len(RANKS)),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(WORKER), str(root / "plan.json"),
    ]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {phase: [json.loads((root / f"{phase}.rank{r}.json").read_text()) for r in RANKS] for phase in PHASES}
    return {"root": root, "configs": configs, "results": results, "one_process_keys": recorder.keys}


def _flat(tensors: dict, prefix: str, suffix: str = "") -> torch.Tensor:
    names = sorted(k for k in tensors if k.startswith(prefix) and k.endswith(suffix) and tensors[k].is_floating_point())
    assert names, prefix + "*" + suffix
    return torch.cat([tensors[k].double().flatten() for k in names])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
def test_ranks_end_every_phase_with_identical_weights(runs):
    for phase in ("straight", "first", "resumed"):
        results = runs["results"][phase]
        assert [r["world_size"] for r in results] == [2, 2], phase
        assert results[0]["hash"] == results[1]["hash"], phase
    assert [r["steps"] for r in runs["results"]["first"]] == [STOP_AT, STOP_AT]
    # Only rank 0 writes the run folder.
    assert [r["step"] for r in _records(runs["root"] / "straight") if "loss" in r] == list(range(1, STEPS + 1))
    assert all(not r["checkpointed"] for r in runs["results"]["straight"][1:])


@pytest.mark.slow
def test_two_ranks_match_one_process_with_the_same_global_batch(runs):
    from safetensors.torch import load_file

    root = runs["root"]
    # Same samples: at step s rank r draws key 2s + r, the single process keys 2s and 2s + 1.
    straight = runs["results"]["straight"]
    assert [straight[r]["keys"] for r in RANKS] == [[2 * s + r for s in range(STEPS)] for r in RANKS]
    assert runs["one_process_keys"] == list(range(2 * STEPS))

    # Step 1 starts from the same initial weights, so AdamW's first moment after it is 0.1 x the
    # gradient: DDP's average of the two ranks' gradients against the batch-2 gradient.
    two, one = (load_file(str(root / f"{name}.state.safetensors")) for name in ("first", "one_process"))
    gradient = _relative(_flat(two, "optim.", ".exp_avg"), _flat(one, "optim.", ".exp_avg"))
    assert gradient <= GRADIENT_TOLERANCE, f"step-1 gradient: 2 ranks vs 1 process differ by {gradient:.3g} (relative)"
    assert _relative(_flat(two, "model."), _flat(one, "model.")) < 5e-3  # step 1 moved them by 5e-2

    # After all steps: the weight updates (final - initial) point the same way.
    config = config_from_dict(json.loads(runs["configs"]["one_process"].read_text()))
    initial, _ = Trainer(config, device="cpu")._build_model(STRUCTURES)
    w0 = _flat({f"model.{k}": v for k, v in initial.state_dict().items()}, "model.")
    two, one = (load_file(str(root / name / "resume" / "state.safetensors")) for name in ("straight", "one_process"))
    update_two, update_one = _flat(two, "model.") - w0, _flat(one, "model.") - w0
    cosine = float(torch.nn.functional.cosine_similarity(update_two, update_one, dim=0))
    distance = _relative(update_two, update_one)
    assert cosine >= MIN_UPDATE_COSINE and distance <= MAX_UPDATE_DISTANCE, (cosine, distance)
    # The logged loss is rank 0's (its own sample), so only the learning rate is comparable.
    lrs = [[r["lr"] for r in _records(root / name) if "loss" in r] for name in ("straight", "one_process")]
    assert lrs[0] == lrs[1]


@pytest.mark.slow
def test_ddp_validation_scores_the_weights_of_its_step(runs):
    """Rank 0 validates every VAL_EVERY steps and at the end while rank 1 waits, on the weights just
    checkpointed at that step, in training mode again afterwards; training goes on between."""
    root = runs["root"]
    records = _records(root / "straight")
    assert [r["step"] for r in records if "val_mean_dice" in r] == [VAL_EVERY, STEPS]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    rank0, rank1 = runs["results"]["straight"]
    assert rank1["validated"] == []
    checkpointed = {int(step): digest for step, digest in rank0["checkpointed"].items()}
    assert [v["hash"] for v in rank0["validated"]] == [checkpointed[VAL_EVERY], checkpointed[STEPS]]
    assert checkpointed[VAL_EVERY] != checkpointed[STEPS] == rank1["hash"]
    assert all(v["training"] for v in rank0["validated"])  # validate() restores the mode
    assert (root / "straight" / "model.safetensors").is_file()


@pytest.mark.slow
def test_ddp_resume_trains_only_the_remaining_steps_and_matches_the_straight_run(runs):
    results = runs["results"]
    assert [r["keys"] for r in results["first"]] == [[2 * s + r for s in range(STOP_AT)] for r in RANKS]
    assert [r["keys"] for r in results["resumed"]] == [[2 * s + r for s in range(STOP_AT, STEPS)] for r in RANKS]
    assert [r["steps"] for r in results["resumed"]] == [STEPS, STEPS]
    assert results["resumed"][0]["hash"] == results["straight"][0]["hash"]
    straight_checkpoints = results["straight"][0]["checkpointed"]
    assert results["resumed"][0]["checkpointed"] == {k: v for k, v in straight_checkpoints.items() if int(k) > STOP_AT}
    assert results["resumed"][0]["validated"] == results["straight"][0]["validated"]
    straight = _without_seconds(_records(runs["root"] / "straight"))
    resumed = _without_seconds(_records(runs["root"] / "interrupted"))
    # The interrupted run also validated at its stop step; everything else matches, validation included.
    assert [r for r in resumed if r["step"] > STOP_AT] == [r for r in straight if r["step"] > STOP_AT]
    assert [r for r in resumed if "loss" in r] == [r for r in straight if "loss" in r]


@pytest.mark.slow
def test_resume_with_another_world_size_is_refused(runs):
    """A 2-rank state resumed by one process, and a 1-process state by two ranks: refused with both sizes."""
    root = runs["root"]
    run = root / "interrupted"
    files = {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()}
    config = config_from_dict(json.loads(runs["configs"]["interrupted"].read_text()))
    with pytest.raises(MoMEError, match="world size 2 x batch 1 per process, this run has world size 1 x batch 1"):
        Trainer(config, device="cpu", resume=True).fit()
    assert {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()} == files
    for result in runs["results"]["grown"]:
        assert "world size 1 x batch 2 per process, this run has world size 2 x batch 2" in result["refused"]
        assert "torchrun --nproc_per_node 1" in result["refused"]
        assert result["keys"] == []
