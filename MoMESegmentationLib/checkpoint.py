"""MoME checkpoints: safetensors weights plus a JSON description, verified by SHA-256.

A checkpoint is two files side by side::

    liver_mome12.safetensors   state dict of the network (+ "vocab.embeddings" [N, T]); buffers the
                               network rebuilds from its config (Swin relative_position_index) are omitted
    liver_mome12.json          architecture, text encoder, structures, preprocessing,
                               provenance, metrics and the SHA-256 of the .safetensors file

The JSON (format ``"mome-checkpoint"``, ``format_version`` 1)::

    {
      "format": "mome-checkpoint", "format_version": 1,
      "architecture": {"variant": "mome-12", "config": {...MoMEConfig fields...}},
      "text_encoder": {"name": ..., "pooling": ..., "template": ..., "dim": 384} | null,
      "accepts_free_text": true,
      "structures": ["liver", "spleen", ...],            # row order of vocab.embeddings
      "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5],
                        "intensity": {"window": [-175, 250], "range": [0, 1]},
                        "patch_size": [96, 96, 96], "overlap": 0.5,
                        "padding": {"mode": "mirror", "mask_valid": true}},   # absent: constant, unmasked
      "provenance": {...}, "metrics": {...}, "extra": {...},
      "weights": {"file": "liver_mome12.safetensors", "sha256": "...", "bytes": 123, "dtype": "float32"}
    }

Loading never unpickles: weights are read with safetensors only, after the file's SHA-256 has been
checked against the JSON. Any problem raises a one-line :class:`~MoMESegmentationLib.errors.CheckpointError`
naming the file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "EMBEDDINGS_KEY",
    "DEFAULT_PREPROCESSING",
    "LoadedCheckpoint",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_meta",
    "resolve_checkpoint_paths",
    "sha256_file",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "mome-checkpoint"
FORMAT_VERSION = 1
#: safetensors key of the structure embedding table ``[N, T]`` (rows follow ``meta["structures"]``).
EMBEDDINGS_KEY = "vocab.embeddings"
#: Preprocessing of the Universal Model / MoME training recipe; ``patch_size`` comes from the model.
DEFAULT_PREPROCESSING: dict[str, Any] = {
    "orientation": "RAS",
    "spacing": [1.5, 1.5, 1.5],
    "intensity": {"window": [-175.0, 250.0], "range": [0.0, 1.0], "clip": True},
    "overlap": 0.5,
}
_TEXT_ENCODER_KEYS = ("name", "pooling", "template", "dim")
#: Buffers that the network rebuilds from its configuration (Swin window index tables, int64);
#: they are not stored, which keeps small checkpoints small.
DERIVED_BUFFERS = ("relative_position_index",)


def _is_derived(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in DERIVED_BUFFERS


@dataclass
class LoadedCheckpoint:
    """A checkpoint read by :func:`load_checkpoint`.

    Attributes:
        model: the network in eval mode, on the requested device, float32.
        meta: the JSON description.
        structure_embeddings: ``[N, T]`` float32 table (rows follow ``meta["structures"]``) or ``None``.
        path: the JSON file.
        weights_path: the safetensors file.
    """

    model: torch.nn.Module
    meta: dict
    structure_embeddings: torch.Tensor | None
    path: Path
    weights_path: Path

    @property
    def structures(self) -> list[str]:
        return list(self.meta["structures"])

    @property
    def accepts_free_text(self) -> bool:
        return bool(self.meta["accepts_free_text"])

    @property
    def text_encoder(self) -> dict | None:
        return self.meta.get("text_encoder")


# -- paths and files -----------------------------------------------------------------------
def resolve_checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(json_path, weights_path)`` for a ``.safetensors`` path, a ``.json`` path or a folder.

    A folder must contain exactly one ``*.json`` with a ``.safetensors`` file of the same stem.
    """
    p = Path(path)
    if not p.exists() and p.suffix not in (".json", ".safetensors"):
        raise CheckpointError(f"{p}: checkpoint not found")
    if p.is_dir():
        candidates = sorted(j for j in p.glob("*.json") if j.with_suffix(".safetensors").exists())
        if len(candidates) != 1:
            found = "no" if not candidates else f"{len(candidates)}"
            raise CheckpointError(
                f"{p}: found {found} checkpoints (a .json beside a .safetensors); expected one"
            )
        p = candidates[0]
    if p.suffix == ".json":
        return p, p.with_suffix(".safetensors")
    if p.suffix == ".safetensors":
        return p.with_suffix(".json"), p
    raise CheckpointError(f"{p}: not a checkpoint (expected a .safetensors file, its .json or their folder)")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move the result onto ``path`` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_ready(value: Any, what: str) -> Any:
    """Deep copy that JSON can encode (tuples -> lists, numpy/torch scalars -> Python numbers)."""
    try:
        return json.loads(json.dumps(value, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serialisable: {exc}") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


# -- save ----------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    text_encoder: dict | None,
    structures: list[str],
    structure_embeddings: torch.Tensor | None,
    preprocessing: dict,
    provenance: dict,
    metrics: dict,
    extra: dict | None = None,
    half: bool = False,
) -> Path:
    """Write ``path`` (``.safetensors``) and its ``.json`` description, atomically.

    Args:
        path: weights file, ending in ``.safetensors``; the JSON goes beside it with the same stem.
        model: a :class:`~MoMESegmentationLib.model.MoME` network.
        text_encoder: ``{"name", "pooling", "template", "dim"}`` of the encoder that produced the
            embeddings; ``None`` or ``{}`` for a fixed-vocabulary model (no free-text prompts).
        structures: ordered structure ids (rows of ``structure_embeddings``).
        structure_embeddings: ``[N, T]`` prompt embeddings of ``structures``, or ``None``.
        preprocessing: overrides of :data:`DEFAULT_PREPROCESSING` (spacing, intensity, overlap, ...).
        provenance: where the weights come from (dataset, recipe, commit, licence, ...).
        metrics: validation results (e.g. per-structure Dice).
        extra: anything else to keep in the JSON.
        half: store floating-point tensors as float16 (they are cast back to float32 on load).

    Returns:
        The JSON path.
    """
    from safetensors.torch import save_file

    from .model import MoME

    weights_path = Path(path)
    if weights_path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {weights_path}")
    if not isinstance(model, MoME):
        raise ValueError(f"model must be a MoME network, got {type(model).__name__}")
    config = model.config
    structures = [str(s) for s in structures]
    if len(set(structures)) != len(structures):
        raise ValueError("structures must be unique ids")
    text_encoder = dict(text_encoder) if text_encoder else None
    if text_encoder is not None:
        missing = [k for k in _TEXT_ENCODER_KEYS if k not in text_encoder]
        if missing:
            raise ValueError(f"text_encoder lacks {', '.join(missing)}")
        if int(text_encoder["dim"]) != config.text_dim:
            raise ValueError(f"text_encoder dim {text_encoder['dim']} != model text_dim {config.text_dim}")
    if structure_embeddings is not None:
        if structure_embeddings.shape != (len(structures), config.text_dim):
            raise ValueError(
                f"structure_embeddings must be [{len(structures)}, {config.text_dim}] "
                f"(structures x text_dim), got {tuple(structure_embeddings.shape)}"
            )
    elif text_encoder is None:
        raise ValueError(
            "a checkpoint needs structure_embeddings or a text_encoder to turn prompts into embeddings"
        )

    prep = copy.deepcopy(DEFAULT_PREPROCESSING)
    prep["patch_size"] = list(config.patch_size)
    prep.update(copy.deepcopy(preprocessing))

    sections = {
        "text_encoder": _json_ready(text_encoder, "text_encoder"),
        "preprocessing": _json_ready(prep, "preprocessing"),
        "provenance": _json_ready(provenance, "provenance"),
        "metrics": _json_ready(metrics, "metrics"),
        "extra": _json_ready(extra or {}, "extra"),
    }

    store_dtype = torch.float16 if half else torch.float32
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if _is_derived(name):
            continue
        t = t.detach().to("cpu")
        tensors[name] = (t.to(store_dtype) if t.is_floating_point() else t).contiguous().clone()
    if EMBEDDINGS_KEY in tensors:
        raise ValueError(f"model state dict already has a {EMBEDDINGS_KEY!r} entry")
    if structure_embeddings is not None:
        tensors[EMBEDDINGS_KEY] = structure_embeddings.detach().to("cpu", store_dtype).contiguous().clone()

    _atomic_write(
        weights_path,
        lambda tmp: save_file(
            tensors, str(tmp), metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION)}
        ),
    )
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "architecture": {"variant": getattr(model, "variant", "custom"), "config": config.to_dict()},
        "text_encoder": sections["text_encoder"],
        "accepts_free_text": text_encoder is not None,
        "structures": structures,
        "has_structure_embeddings": structure_embeddings is not None,
        "preprocessing": sections["preprocessing"],
        "provenance": sections["provenance"],
        "metrics": sections["metrics"],
        "extra": sections["extra"],
        "weights": {
            "file": weights_path.name,
            "sha256": sha256_file(weights_path),
            "bytes": weights_path.stat().st_size,
            "dtype": "float16" if half else "float32",
        },
    }
    json_path = weights_path.with_suffix(".json")
    text = json.dumps(meta, indent=2) + "\n"
    _atomic_write(json_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    logger.info("saved checkpoint %s (%d tensors, %s)", weights_path, len(tensors), meta["weights"]["dtype"])
    return json_path


# -- load ----------------------------------------------------------------------------------
def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """The validated JSON description of a checkpoint (weights are not read)."""
    json_path, _ = resolve_checkpoint_paths(path)
    if not json_path.is_file():
        raise CheckpointError(f"{json_path}: checkpoint description (.json) not found")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{json_path}: unreadable checkpoint description ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{json_path}: not a MoME checkpoint description (format {found!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{json_path}: checkpoint format version {meta.get('format_version')!r} is not supported "
            f"(this library reads version {FORMAT_VERSION})"
        )
    for key in ("architecture", "structures", "weights", "preprocessing", "accepts_free_text"):
        if key not in meta:
            raise CheckpointError(f"{json_path}: checkpoint description lacks {key!r}")
    return meta


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Read, verify and instantiate a checkpoint.

    Args:
        path: the ``.safetensors`` file, its ``.json`` or the folder holding both.
        device: where to put the model and the embedding table.

    Returns:
        :class:`LoadedCheckpoint` with the model in eval mode (float32).

    Raises:
        CheckpointError: missing or tampered files, unknown format or architecture, or weights that
            do not match the architecture exactly.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    from .model import MoME, MoMEConfig

    json_path, weights_path = resolve_checkpoint_paths(path)
    meta = read_checkpoint_meta(json_path)
    recorded = meta["weights"]
    if recorded.get("file", weights_path.name) != weights_path.name:
        raise CheckpointError(
            f"{json_path}: describes weights {recorded.get('file')!r}, not {weights_path.name!r}"
        )
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: checkpoint weights file not found")
    data = weights_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != recorded.get("sha256"):
        raise CheckpointError(
            f"{weights_path}: SHA-256 {digest[:12]}... does not match {str(recorded.get('sha256'))[:12]}... "
            f"recorded in {json_path.name}; the file is corrupt or was modified"
        )
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({exc})") from None

    arch = meta["architecture"]
    try:
        config = MoMEConfig.from_dict(arch["config"])
        model = MoME(config, variant=str(arch.get("variant", "custom")))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{json_path}: invalid architecture ({exc})") from None

    embeddings = tensors.pop(EMBEDDINGS_KEY, None)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise CheckpointError(f"{weights_path}: weights do not match the architecture: {first}") from None
    missing = [k for k in result.missing_keys if not _is_derived(k)]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
        if result.unexpected_keys:
            parts.append(f"unexpected {len(result.unexpected_keys)} (e.g. {result.unexpected_keys[0]})")
        raise CheckpointError(f"{weights_path}: weights do not match the architecture: {'; '.join(parts)}")
    model.to(device).eval()

    structures = meta["structures"]
    if embeddings is not None:
        embeddings = embeddings.float().to(device)
        if embeddings.shape != (len(structures), config.text_dim):
            raise CheckpointError(
                f"{weights_path}: {EMBEDDINGS_KEY} has shape {tuple(embeddings.shape)}, expected "
                f"[{len(structures)}, {config.text_dim}]"
            )
        if not math.isfinite(float(embeddings.abs().sum())):
            raise CheckpointError(f"{weights_path}: {EMBEDDINGS_KEY} holds non-finite values")
    logger.info("loaded checkpoint %s (%s, %d structures)", weights_path, model.variant, len(structures))
    return LoadedCheckpoint(model, meta, embeddings, json_path, weights_path)
