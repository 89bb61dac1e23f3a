"""Helpers for the training tests, and the per-rank script that test_ddp.py starts with torchrun.

As a script (one process per rank)::

    python -m torch.distributed.run --nproc_per_node 2 ddp_worker.py CONFIG.json OUT_DIR STEPS

trains ``STEPS`` steps with gloo on the CPU and writes ``OUT_DIR/rank<R>.json`` with the SHA-256 of
that rank's final weights.
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


def main(argv: list[str]) -> int:
    import torch

    from MoMESegmentationLib.training.config import config_from_dict
    from MoMESegmentationLib.training.trainer import Trainer, state_hash

    config_path, out_dir, steps = Path(argv[0]), Path(argv[1]), int(argv[2])
    torch.set_num_threads(1)
    config = config_from_dict(json.loads(config_path.read_text()), source=str(config_path))
    trainer = Trainer(config, device="cpu", stop_step=steps)
    try:
        trainer.fit()
        result = {"rank": trainer.rank, "world_size": trainer.world_size, "hash": state_hash(trainer.model)}
    finally:
        trainer.close()
    (out_dir / f"rank{result['rank']}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
