"""Helpers for the training tests, and the per-rank script that test_ddp.py starts with torchrun.

As a script (one process per rank)::

    python -m torch.distributed.run --nproc_per_node 2 ddp_worker.py PLAN.json

runs the phases of ``PLAN.json`` one after the other in the same process group, each with a fresh
:class:`Trainer` that knows of the earlier phases only what they left in their run folders::

    {"out": "DIR", "phases": [{"name": "straight", "config": "a.json"},
                              {"name": "first", "config": "b.json", "stop_step": 1},
                              {"name": "resumed", "config": "b.json", "resume": true}]}

and writes ``DIR/<name>.rank<R>.json`` per phase: the SHA-256 of that rank's final weights, the
steps it reports, the sample keys its data loader asked for (the keys encode the step, see
:class:`~MoMESegmentationLib.training.datasets.StepSampler`), so a test can tell which steps a
phase actually trained, and the SHA-256 of the weights it validated and checkpointed. Rank 0
also copies the phase's resume state to ``DIR/<name>.state.safetensors``. A phase with
``"refused": true`` is expected to stop with a ``MoMEError``, whose message is recorded instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TINY_CONFIG = REPO_ROOT / "configs" / "test_tiny.yaml"


def tiny_config_dict(output_dir: Path, cache: Path, **sections) -> dict:
    """``configs/test_tiny.yaml`` as a dict with the run folder and embedding cache replaced."""
    import yaml

    raw = yaml.safe_load(TINY_CONFIG.read_text())
    raw["output"]["dir"] = str(output_dir)
    raw["text"]["embeddings_cache"] = str(cache)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def make_embedding_cache(path: Path, structures: list[str], synonyms: int = 1) -> Path:
    """Prompt embeddings from the real text encoder when it is installed, else fixed random rows.

    Random rows still exercise every training mechanism (prompt conditioning, partial labels);
    only free-text generalisation needs the encoder.
    """
    import torch

    from MoMESegmentationLib.training.config import TextConfig
    from MoMESegmentationLib.training.prompts import PromptTable, load_or_compute_prompts

    if path.is_file():
        return path
    try:
        load_or_compute_prompts(TextConfig(embeddings_cache=str(path), synonyms=synonyms), structures)
    except Exception:  # noqa: BLE001 - no encoder on this machine: fall back to fixed rows
        generator = torch.Generator().manual_seed(1234)
        rows = torch.nn.functional.normalize(torch.randn(len(structures), 384, generator=generator), dim=1)
        PromptTable(list(structures), list(structures), rows).save(path)
    return path


class KeyRecorder:
    """Records the sample keys that ``TrainingSamples`` is asked for, while installed."""

    def __init__(self) -> None:
        self.keys: list[int] = []

    def __enter__(self) -> KeyRecorder:
        from MoMESegmentationLib.training.datasets import TrainingSamples

        self._original = TrainingSamples.__getitem__
        recorder = self

        def getitem(samples, key):
            recorder.keys.append(int(key))
            return recorder._original(samples, key)

        TrainingSamples.__getitem__ = getitem
        return self

    def __exit__(self, *exc) -> None:
        from MoMESegmentationLib.training.datasets import TrainingSamples

        TrainingSamples.__getitem__ = self._original


class WeightsSeen:
    """Records the weights (SHA-256) that ``Trainer.validate`` scores and ``Trainer`` checkpoints, while installed."""

    def __init__(self) -> None:
        self.validated: list[dict] = []
        self.checkpointed: dict[int, str] = {}

    def __enter__(self) -> WeightsSeen:
        from MoMESegmentationLib.training.trainer import Trainer, state_hash

        self._originals = Trainer.validate, Trainer._save_checkpoint
        validate, save_checkpoint = self._originals
        seen = self

        def validating(trainer, model, *args, **kwargs):
            seen.validated.append({"hash": state_hash(model), "training": model.training})
            return validate(trainer, model, *args, **kwargs)

        def checkpointing(trainer, path, model, prompts, structures, step, *args, **kwargs):
            seen.checkpointed[int(step)] = state_hash(model)
            return save_checkpoint(trainer, path, model, prompts, structures, step, *args, **kwargs)

        Trainer.validate, Trainer._save_checkpoint = validating, checkpointing
        return self

    def __exit__(self, *exc) -> None:
        from MoMESegmentationLib.training.trainer import Trainer

        Trainer.validate, Trainer._save_checkpoint = self._originals


def main(argv: list[str]) -> int:
    import shutil

    import torch

    from MoMESegmentationLib.errors import MoMEError
    from MoMESegmentationLib.training.config import config_from_dict
    from MoMESegmentationLib.training.trainer import RESUME_DIR, RESUME_TENSORS, Trainer, state_hash

    plan = json.loads(Path(argv[0]).read_text())
    out = Path(plan["out"])
    torch.set_num_threads(1)
    trainer = None
    try:
        for phase in plan["phases"]:
            config_path = Path(phase["config"])
            config = config_from_dict(json.loads(config_path.read_text()), source=str(config_path))
            # The process group started by the first phase is reused by the later ones.
            trainer = Trainer(config, device="cpu", stop_step=phase.get("stop_step"), resume=phase.get("resume", False))
            record = {"rank": trainer.rank, "world_size": trainer.world_size}
            with KeyRecorder() as recorder, WeightsSeen() as seen:
                try:
                    result = trainer.fit()
                except MoMEError as error:
                    if not phase.get("refused"):
                        raise
                    record["refused"] = str(error)
                else:
                    record.update(steps=result.steps, hash=state_hash(trainer.model))
                    if trainer.is_main:  # the resume state (weights and AdamW moments) as this phase left it
                        shutil.copy(trainer.output_dir / RESUME_DIR / RESUME_TENSORS, out / f"{phase['name']}.state.safetensors")
            record.update(keys=recorder.keys, validated=seen.validated, checkpointed=seen.checkpointed)
            (out / f"{phase['name']}.rank{trainer.rank}.json").write_text(json.dumps(record))
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
