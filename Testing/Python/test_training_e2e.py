"""End-to-end training on phantoms: learning, resume after a kill, fine-tuning with new structures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("monai")
pytest.importorskip("MoMESegmentationLib.data.phantoms")

from ddp_worker import REPO_ROOT, TINY_CONFIG, make_embedding_cache, tiny_config_dict  # noqa: E402

from MoMESegmentationLib.training.config import config_from_dict, load_config  # noqa: E402
from MoMESegmentationLib.training.trainer import Trainer  # noqa: E402

STRUCTURES = ["liver", "spleen", "kidney_left", "kidney_right"]
NEW_STRUCTURE = "urinary_bladder"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "embeddings.safetensors"
    return make_embedding_cache(path, STRUCTURES + [NEW_STRUCTURE])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """The CI run of configs/test_tiny.yaml through the ``mome train`` entry point."""
    out = tmp_path_factory.mktemp("tiny")
    raw = tiny_config_dict(out, cache)
    config_path = out / "config_in.json"
    config_path.write_text(json.dumps(raw))
    config = config_from_dict(raw)
    untrained = Trainer(config, device="cpu", stop_step=0)
    before = _initial_dice(untrained, config)
    proc = subprocess.run(
        [sys.executable, "-m", "MoMESegmentationLib.training", "train", str(config_path), "--device", "cpu"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, before, config


def _initial_dice(trainer: Trainer, config) -> float:
    """Validation mean Dice of the freshly initialised network."""
    from MoMESegmentationLib.training.datasets import build_validation_items
    from MoMESegmentationLib.training.prompts import load_or_compute_prompts

    prompts = load_or_compute_prompts(config.text, STRUCTURES)
    trainer._rows = prompts.rows_for(STRUCTURES)
    model, _ = trainer._build_model(STRUCTURES)
    items = build_validation_items(config, STRUCTURES, [])
    return trainer.validate(model, items, prompts)["val_mean_dice"]


def test_tiny_config_loads():
    config = load_config(TINY_CONFIG)
    assert config.data.structures == STRUCTURES
    assert config.schedule.max_steps >= config.schedule.checkpoint_every


def test_validation_dice_rises(trained):
    out, before, _ = trained
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_mean_dice" in r]
    assert val, "no validation record in log.jsonl"
    after = val[-1]["val_mean_dice"]
    assert after >= before + 0.1, f"validation Dice {before:.3f} -> {after:.3f}"
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "model.safetensors").is_file() and (out / "model.json").is_file()
    meta = json.loads((out / "model.json").read_text())
    assert meta["structures"] == STRUCTURES
    assert meta["preprocessing"]["spacing"] == [6.0, 6.0, 6.0]
    assert len(list((out / "checkpoints").glob("step_*.safetensors"))) >= 1


def test_checkpoint_loads_for_inference(trained):
    import torch

    from MoMESegmentationLib.checkpoint import load_checkpoint

    out, _, _ = trained
    loaded = load_checkpoint(out / "model.safetensors", device="cpu")
    assert loaded.structure_embeddings.shape == (len(STRUCTURES), 384)
    logits = loaded.model.eval()(torch.zeros(1, 1, 64, 64, 64), loaded.structure_embeddings[:2])
    assert logits.shape == (1, 2, 64, 64, 64)


def test_validate_scores_a_checkpoint_like_training_did(trained, tmp_path):
    """``mome train CONFIG --validate CKPT`` reproduces the validation Dice logged at the last step."""
    out, _, _ = trained
    proc = subprocess.run(
        [sys.executable, "-m", "MoMESegmentationLib.training", "train", str(out / "config_in.json"), "--device", "cpu",
         "--validate", str(out / "model.safetensors"), "--output", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "validation.json").read_text())
    logged = json.loads((out / "model.json").read_text())["metrics"]
    assert result["structures"] == STRUCTURES and len(result["held_out_cases"]) == 2
    for name, dice in logged["val_dice"].items():
        assert result["val_dice"][name] == pytest.approx(dice, abs=1e-4), name
    assert "mean Dice" in proc.stdout
    assert not (tmp_path / "model.safetensors").exists()


class Interrupted(Exception):
    """Stands in for a kill in the middle of a run."""


RESUME_STEPS, RESUME_AT = 3, 1  # N scheduled steps; the interrupted run's last complete checkpoint
RESUME_SECTIONS = {
    # Every step logged and checkpointed, so the log and the resume state tell exactly which steps ran.
    "schedule": {"max_steps": RESUME_STEPS, "checkpoint_every": 1, "val_every": 0, "warmup_steps": 1},
    "logging": {"log_every": 1, "plot": False, "progress": False},
    "data": {"datasets": [{"kind": "phantoms", "name": "phantoms", "n": 4, "seed": 0, "spacing_range": [6.0, 6.0],
                           "random_orientation": True}], "validation": {"phantoms": 0}},
    "transforms": {"patch_size": [64, 32, 32]},
}


def _cli(*argv: str) -> int:
    from MoMESegmentationLib.training.cli import main

    return main([*argv, "--device", "cpu"])


def _log_lines(run) -> list[str]:
    return (run / "log.jsonl").read_text().splitlines()


def _resume_tensors(run) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "resume" / "state.safetensors"))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, cache):
    """An uninterrupted run of N steps, and a run killed during step k+1 then resumed with ``--resume``.

    The kill comes after step k+1 was logged but before its checkpoint was written, as a real kill
    can: the resume state is at step k and the log already holds a record of step k+1.
    """
    from ddp_worker import KeyRecorder

    root = tmp_path_factory.mktemp("resume")
    configs = {}
    for name in ("straight", "interrupted"):
        configs[name] = root / f"{name}.json"
        configs[name].write_text(json.dumps(tiny_config_dict(root / name, cache, **RESUME_SECTIONS)))
    assert _cli(str(configs["straight"])) == 0

    save_checkpoint = Trainer._save_checkpoint

    def killed_at_next_checkpoint(self, path, model, prompts, structures, step, *args, **kwargs):
        if step == RESUME_AT + 1:
            raise Interrupted(step)
        return save_checkpoint(self, path, model, prompts, structures, step, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_save_checkpoint", killed_at_next_checkpoint)
        with pytest.raises(Interrupted):
            _cli(str(configs["interrupted"]))
    run = root / "interrupted"
    before = {"log": _log_lines(run), "state": json.loads((run / "resume" / "state.json").read_text())}
    with KeyRecorder() as recorder:
        assert _cli(str(configs["interrupted"]), "--resume") == 0
    return {"root": root, "configs": configs, "before": before, "keys": recorder.keys}


def test_resume_trains_only_the_steps_after_the_checkpoint(resumed):
    """The resumed run trains steps k+1..N and nothing else; a restart from step 0 fails here."""
    before = resumed["before"]
    assert before["state"]["step"] == RESUME_AT
    assert [json.loads(line)["step"] for line in before["log"]] == list(range(1, RESUME_AT + 2))
    # Step s draws sample key s - 1 (one process, batch 1): the resumed run drew keys k..N-1 only.
    assert resumed["keys"] == list(range(RESUME_AT, RESUME_STEPS))
    after = _log_lines(resumed["root"] / "interrupted")
    assert [json.loads(line)["step"] for line in after] == list(range(1, RESUME_STEPS + 1))
    # Records of steps <= k are the first run's, byte for byte (their wall-clock "seconds" included);
    # the first run's record of the unfinished step k+1 was dropped and written again.
    assert after[:RESUME_AT] == before["log"][:RESUME_AT]
    assert after[RESUME_AT] != before["log"][RESUME_AT]


def test_resumed_run_matches_the_uninterrupted_one_bit_for_bit(resumed):
    import torch

    root = resumed["root"]
    straight, interrupted = _resume_tensors(root / "straight"), _resume_tensors(root / "interrupted")
    assert sorted(straight) == sorted(interrupted)
    assert any(name.startswith("optim.") for name in straight)
    for name in straight:  # weights and AdamW moments
        assert torch.equal(straight[name], interrupted[name]), name

    def logged(run):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in _log_lines(run)]

    assert logged(root / "interrupted") == logged(root / "straight")


@pytest.mark.parametrize("section, value, named", [
    ("seed", 1, ["schedule.seed 0", "schedule.seed 1"]),
    ("batch_size", 2, ["batch 1", "batch 2"]),
])
def test_resume_refuses_a_state_that_another_seed_or_batch_wrote(resumed, capsys, section, value, named):
    """Another seed (or batch) draws other samples from the resumed step on: refused, folder untouched."""
    root = resumed["root"]
    raw = json.loads(resumed["configs"]["interrupted"].read_text())
    raw["schedule"][section] = value
    config = root / f"other_{section}.json"
    config.write_text(json.dumps(raw))
    run = root / "interrupted"
    files = {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()}
    capsys.readouterr()
    assert _cli(str(config), "--resume") == 2
    message = capsys.readouterr().err
    assert "resume/state.json" in message
    for text in named:
        assert text in message, message
    assert {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()} == files


@pytest.mark.slow
def test_finetune_adds_structure_without_forgetting(trained, tmp_path, cache):
    base_dir, _, base_config = trained
    base_metrics = json.loads((base_dir / "model.json").read_text())["metrics"]["val_dice"]
    sections = {
        "data": {"structures": STRUCTURES + [NEW_STRUCTURE]},
        "schedule": {"max_steps": 12, "warmup_steps": 4, "checkpoint_every": 0, "val_every": 0},
        "optim": {"lr": 0.0001},
        "init": {"checkpoint": str(base_dir / "model.safetensors")},
        "logging": {"plot": False, "progress": False},
    }
    config = config_from_dict(tiny_config_dict(tmp_path, cache, **sections))
    result = Trainer(config, device="cpu").fit()
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["structures"] == STRUCTURES + [NEW_STRUCTURE]
    assert meta["provenance"]["new_structures"] == [NEW_STRUCTURE]
    # Forgetting is measured on the structures the short CI base run has learned (Dice >= 0.3); the
    # Dice of a structure still at chance level moves by more than 0.02 from any update.
    learned = [name for name in STRUCTURES if base_metrics[name] >= 0.3]
    assert learned, base_metrics
    for name in learned:
        assert result.val_dice[name] >= base_metrics[name] - 0.02, (name, base_metrics[name], result.val_dice[name])
    assert NEW_STRUCTURE in result.val_dice
