"""Reading third-party PyTorch ``.pth`` / ``.pt`` files without running code from them.

A ``.pth`` file is a pickle, and unpickling can call any Python function the file names.
Public weights are therefore read only with ``torch.load(..., weights_only=True,
map_location="cpu")``: PyTorch's restricted unpickler accepts tensors, plain containers and
numbers and refuses every other global before it is called. A refused file raises a one-line
:class:`~MoMESegmentationLib.errors.CheckpointError`; nothing in it runs.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import sha256_file
from ..errors import CheckpointError

__all__ = ["load_weights_only", "find_state_dict", "strip_prefix", "sha256_file"]

logger = logging.getLogger(__name__)

#: Keys under which training scripts commonly store the network's state dict, most specific first.
STATE_DICT_KEYS = ("net", "state_dict", "model", "model_state_dict", "network", "weights")


def load_weights_only(path: str | os.PathLike) -> Any:
    """Load a ``.pth``/``.pt`` file with PyTorch's weights-only unpickler onto the CPU.

    Args:
        path: the file.

    Returns:
        Whatever the file holds (tensors, dicts, lists, numbers, strings).

    Raises:
        CheckpointError: missing or unreadable file, or a file that holds Python objects other
            than tensors and plain containers (it is refused before any of them is created).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: file not found")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = " ".join(str(exc).split())
        detail = _refused_global(reason)
        raise CheckpointError(
            f"{p}: refused to load: the file holds Python objects other than tensors{detail}; "
            f"only weights-only .pth files are read (nothing from the file was run)"
        ) from None
    except Exception as exc:  # noqa: BLE001 -- arbitrary bytes make the unpickler fail in many ways
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        if not isinstance(exc, (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError)):
            reason = f"{type(exc).__name__}: {reason}"  # e.g. IndexError from a text file
        raise CheckpointError(f"{p}: not a readable PyTorch weights file ({reason})") from None


def _refused_global(message: str) -> str:
    """`` (it names io.open)`` from PyTorch's refusal message, when the message names the global."""
    marker = "Unsupported global: GLOBAL "
    if marker in message:
        name = message.split(marker, 1)[1].split()[0]
        return f" (it names {name})"
    return ""


def find_state_dict(
    obj: Any, path: str | os.PathLike, keys: Iterable[str] = STATE_DICT_KEYS
) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` state dict inside a loaded checkpoint.

    Training scripts save either the state dict itself or a dict that holds it under ``net``,
    ``state_dict``, ``model``, ... next to optimizer state and counters. Non-tensor entries of
    the state dict (rare: e.g. version counters) are dropped.

    Raises:
        CheckpointError: nothing that looks like a state dict.
    """
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        for key in keys:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                return {str(k): v for k, v in inner.items() if isinstance(v, torch.Tensor)}
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        found = ", ".join(sorted(str(k) for k in obj)[:8])
        raise CheckpointError(f"{path}: no state dict found (top-level keys: {found or 'none'})")
    raise CheckpointError(f"{path}: no state dict found (the file holds a {type(obj).__name__})")


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` (e.g. ``"module."`` from DistributedDataParallel) when every key has it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)
