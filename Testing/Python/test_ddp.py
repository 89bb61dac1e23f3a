"""DDP: two CPU processes (gloo, torchrun) train a few steps and end with identical weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("MoMESegmentationLib.data.phantoms")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from ddp_worker import REPO_ROOT, make_embedding_cache, tiny_config_dict  # noqa: E402

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_end_with_identical_weights(tmp_path):
    cache = make_embedding_cache(tmp_path / "embeddings.safetensors", ["liver", "spleen", "kidney_left", "kidney_right"])
    raw = tiny_config_dict(
        tmp_path / "run", cache,
        schedule={"max_steps": 3, "warmup_steps": 1, "checkpoint_every": 0, "val_every": 0},
        logging={"plot": False, "progress": False},
    )
    raw["data"]["validation"] = {"phantoms": 0}
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(raw))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(WORKER), str(config_path), str(tmp_path), "2",
    ]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in results] == [2, 2]
    assert results[0]["hash"] == results[1]["hash"]
    # Only rank 0 writes the run folder; the run stopped after 2 of its 3 scheduled steps.
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2
    assert (tmp_path / "run" / "model.safetensors").is_file()
