"""The model registry: which models exist, where they are stored and whether they are present.

Entries live in ``Resources/models.json``. A *bundled* entry points at files inside
``Resources/`` (the demo weights); an *imported* entry names public weights that the user
downloads (``mome models download``) or brings, and converts (``mome import``) into the user's
model store. The store is ``~/.mome/models`` unless a caller passes another folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError
from .resources import resource_path, resources_dir

__all__ = ["ModelEntry", "DEFAULT_MODEL", "default_store", "load_registry", "get_entry", "resolve_model"]

logger = logging.getLogger(__name__)

#: The model used when none is named: the bundled demo weights.
DEFAULT_MODEL = "demo"


def default_store() -> Path:
    """The folder that holds downloaded and converted models (``~/.mome/models``)."""
    return Path.home() / ".mome" / "models"


@dataclass(frozen=True)
class ModelEntry:
    """One row of ``Resources/models.json``."""

    name: str  # registry key, e.g. "demo" or "universal-model"
    title: str  # one-line human title
    kind: str  # "bundled" (ships in Resources/), "imported" (converted by `mome import`) or "backbone"
    description: str = ""
    version: str = ""
    license: str = ""
    training_data: str = ""
    intended_use: str = "Research use only; not for diagnosis."
    structures: tuple[str, ...] = ()
    checkpoint: str = ""  # bundled: path relative to Resources/; imported: file name in the store
    source_url: str = ""  # where the public weights can be downloaded
    source_file: str = ""  # the downloaded file's name
    source_size: int = 0  # expected download size in bytes (0 = unknown)
    import_command: str = ""  # how to turn the download into a checkpoint
    extra: dict = field(default_factory=dict)

    def checkpoint_path(self, store: Path | None = None) -> Path | None:
        """Where this model's checkpoint lives (``None`` for entries that are not segmentation models)."""
        if not self.checkpoint:
            return None
        if self.kind == "bundled":
            return resources_dir() / self.checkpoint
        return (store or default_store()) / self.checkpoint

    def is_present(self, store: Path | None = None) -> bool:
        path = self.checkpoint_path(store)
        return path is not None and path.is_file()


def load_registry(path: Path | None = None) -> dict[str, ModelEntry]:
    """Read the registry (``Resources/models.json`` by default) into ``{name: ModelEntry}``."""
    path = path or resource_path("models.json")
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))["models"]
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: cannot read the model registry ({error})") from None
    known = set(ModelEntry.__dataclass_fields__)
    entries = {}
    for row in rows:
        row = dict(row)
        row["structures"] = tuple(row.get("structures", ()))
        extra = {k: row.pop(k) for k in list(row) if k not in known}
        entries[row["name"]] = ModelEntry(**row, extra=extra) if extra else ModelEntry(**row)
    return entries


def get_entry(name: str, registry: dict[str, ModelEntry] | None = None) -> ModelEntry:
    registry = registry if registry is not None else load_registry()
    if name not in registry:
        raise CheckpointError(f"unknown model '{name}': registered models are {', '.join(sorted(registry))}")
    return registry[name]


def resolve_model(name_or_path: str | Path | None, store: Path | None = None) -> Path:
    """Turn a registry name or a checkpoint path into the path of a ``.safetensors`` checkpoint.

    Raises :class:`CheckpointError` with a one-line message when the name is unknown, the
    model is not downloaded/imported yet, or the path does not exist.
    """
    name_or_path = DEFAULT_MODEL if name_or_path in (None, "") else name_or_path
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    looks_like_path = candidate.suffix in {".safetensors", ".json"} or "/" in text or "\\" in text
    if looks_like_path or candidate.exists():
        if not candidate.exists():
            raise CheckpointError(f"{candidate}: model checkpoint not found")
        return candidate
    registry = load_registry()
    entry = get_entry(text, registry)
    path = entry.checkpoint_path(store)
    if path is None:
        raise CheckpointError(f"model '{text}' is a backbone initialisation, not a segmentation model")
    if not path.is_file():
        hint = f"; get it with `mome models download {text}` then `{entry.import_command}`" if entry.import_command else ""
        raise CheckpointError(f"model '{text}' is not installed (expected {path}){hint}")
    return path
