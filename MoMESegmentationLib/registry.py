"""The model registry: which models exist, where they are stored and whether they are present.

Entries live in ``Resources/models.json``. A *bundled* entry points at files inside
``Resources/`` (the demo weights); an *imported* entry names public weights that the user
installs into the model store (``mome models install NAME``, which downloads and converts them, or
``--file`` with a file brought by other means). The store is ``~/.mome/models`` unless a caller
passes another folder. Checkpoints installed under a name of their own
(``mome models install NAME --file CHECKPOINT.safetensors``) sit in ``<store>/<NAME>/`` and are
found by that name too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError
from .resources import resource_path, resources_dir

__all__ = [
    "ModelEntry",
    "InstalledModel",
    "DEFAULT_MODEL",
    "SEGMENTATION_KINDS",
    "default_store",
    "load_registry",
    "get_entry",
    "resolve_model",
    "find_local_checkpoint",
    "installed_models",
    "suggest_models",
]

logger = logging.getLogger(__name__)

#: The model used when none is named: the bundled demo weights.
DEFAULT_MODEL = "demo"


def default_store() -> Path:
    """The folder that holds downloaded and converted models (``~/.mome/models``)."""
    return Path.home() / ".mome" / "models"


#: Registry kinds that are segmentation models (a "backbone" entry only initialises training).
SEGMENTATION_KINDS = ("bundled", "imported")


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
    source_sha256: str = ""  # expected SHA-256 of the download, hex ("" = not checked)
    import_command: str = ""  # how to turn the download into a checkpoint
    extra: dict = field(default_factory=dict)

    @property
    def is_segmentation_model(self) -> bool:
        """Bundled and imported entries segment; backbone entries only initialise training."""
        return self.kind in SEGMENTATION_KINDS

    def checkpoint_path(self, store: Path | None = None, resources: Path | str | None = None) -> Path | None:
        """Where this model's checkpoint lives (``None`` for entries without one).

        Bundled checkpoints are under ``resources`` (default: the library's ``Resources/``), the
        others in the user's model ``store``.
        """
        if not self.checkpoint:
            return None
        if self.kind == "bundled":
            return Path(resources or resources_dir()) / self.checkpoint
        return Path(store or default_store()) / self.checkpoint

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
    if not isinstance(rows, list):
        raise CheckpointError(f"{path}: 'models' must be a list")
    known = set(ModelEntry.__dataclass_fields__) - {"extra"}
    entries = {}
    for number, row in enumerate(rows, start=1):
        name = str(row.get("name") or "").strip() if isinstance(row, dict) else ""
        if not name:
            logger.warning("%s: model %d has no name; skipped", path, number)
            continue
        structures = row.get("structures")
        fields = {k: v for k, v in row.items() if k in known}
        fields.update(name=name, title=str(row.get("title") or name), kind=str(row.get("kind") or "bundled"),
                      structures=tuple(str(s) for s in structures) if isinstance(structures, list) else ())
        if "source_sha256" in fields:
            digest = str(fields["source_sha256"] or "").strip().lower()
            if digest and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
                raise CheckpointError(
                    f"{path}: model '{name}' has a malformed source_sha256 (expected 64 hex digits)"
                )
            fields["source_sha256"] = digest
        entries[name] = ModelEntry(**fields, extra={k: v for k, v in row.items() if k not in known})
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
    if text not in registry:
        local = find_local_checkpoint(text, store)
        if local is not None:
            return local
    entry = get_entry(text, registry)
    path = entry.checkpoint_path(store)
    if path is None:
        raise CheckpointError(f"model '{text}' is a backbone initialisation, not a segmentation model")
    if not path.is_file():
        installable = entry.source_url or entry.import_command
        hint = f"; install it with `mome models install {text}`" if installable else ""
        raise CheckpointError(f"model '{text}' is not installed (expected {path}){hint}")
    return path


def find_local_checkpoint(name: str, store: Path | None = None) -> Path | None:
    """The checkpoint ``<store>/*/<name>.safetensors`` (with its ``.json``) of a model outside the
    registry, as :func:`installed_models` names them; ``None`` when there is none or several."""
    root = Path(store) if store is not None else default_store()
    if not name or any(c in name for c in "/\\*?[]") or not root.is_dir():
        return None
    found = [p for p in root.glob(f"*/{name}.safetensors")
             if not p.parent.name.startswith(".") and p.is_file() and p.with_suffix(".json").is_file()]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class InstalledModel:
    """A segmentation model that is ready to use (what a model selector lists).

    Attributes:
        name: registry name, or the checkpoint's file stem for a checkpoint outside the registry.
        title: one-line human title.
        path: the ``.safetensors`` checkpoint (pass it, or ``name`` for registered models, to the engine).
        structures: structure ids the model segments (rows of its embedding table).
        accepts_free_text: whether prompts outside ``structures`` are allowed (text encoder present).
        license: license of the weights.
        source: where the weights came from (registry ``source_url`` or the checkpoint's provenance).
        kind: ``"bundled"``, ``"imported"`` or ``"local"`` (found in the store, not in the registry).
        source_sha256: SHA-256 of the file a converted model was imported from (``""`` if none).
    """

    name: str
    title: str
    path: Path
    structures: tuple[str, ...]
    accepts_free_text: bool
    license: str = ""
    source: str = ""
    kind: str = "local"
    source_sha256: str = ""


def _installed_from_meta(name: str, title: str, path: Path, kind: str, meta: dict,
                         entry: ModelEntry | None = None) -> InstalledModel:
    provenance = meta.get("provenance") or {}
    return InstalledModel(
        name=name,
        title=title,
        path=path,
        structures=tuple(meta.get("structures", ())),
        accepts_free_text=bool(meta.get("accepts_free_text", False)),
        license=(entry.license if entry and entry.license else str(provenance.get("license", ""))),
        source=(entry.source_url if entry and entry.source_url else str(provenance.get("source_url", ""))),
        kind=kind,
        source_sha256=str(provenance.get("source_sha256", "")),
    )


def installed_models(store: Path | None = None) -> list[InstalledModel]:
    """Every segmentation model that can be used now: registry entries whose checkpoint is present
    (bundled or imported into ``store``) and any other checkpoint found in ``store`` (``*/*.json``
    beside a ``.safetensors``). Only JSON descriptions are read; weights are not loaded.

    Args:
        store: the model store (default ``~/.mome/models``).

    Returns:
        Registered models first (registry order), then other checkpoints by name.
    """
    from .checkpoint import read_checkpoint_meta

    store = Path(store) if store is not None else default_store()
    found: list[InstalledModel] = []
    seen: set[Path] = set()
    for entry in load_registry().values():
        path = entry.checkpoint_path(store)
        if path is None or not path.is_file():
            continue
        try:
            meta = read_checkpoint_meta(path)
        except CheckpointError as error:
            logger.warning("skipping %s: %s", entry.name, error)
            continue
        found.append(_installed_from_meta(entry.name, entry.title, path, entry.kind, meta, entry))
        seen.add(path.resolve())
    others = []
    if store.is_dir():
        for json_path in sorted(store.glob("*/*.json")):
            if json_path.parent.name.startswith("."):
                continue  # an installation in progress (see model_install)
            weights = json_path.with_suffix(".safetensors")
            if not weights.is_file() or weights.resolve() in seen:
                continue
            try:
                meta = read_checkpoint_meta(json_path)
            except CheckpointError:
                continue
            title = str((meta.get("provenance") or {}).get("model", weights.stem))
            others.append(_installed_from_meta(weights.stem, title, weights, "local", meta))
    return found + sorted(others, key=lambda m: m.name)


def suggest_models(structure_id: str, store: Path | None = None) -> list[str]:
    """Names of models that segment ``structure_id``: installed ones first, then registry entries
    that can be downloaded (from their ``structures`` lists).

    Args:
        structure_id: a vocabulary id such as ``"liver_tumor"``.
        store: the model store (default ``~/.mome/models``).

    Returns:
        Model names (registry names, or checkpoint stems for unregistered local checkpoints),
        without repeats; empty when no known model lists the structure.
    """
    names: list[str] = []
    for model in installed_models(store):
        if structure_id in model.structures and model.name not in names:
            names.append(model.name)
    for entry in load_registry().values():
        if structure_id in entry.structures and entry.name not in names:
            names.append(entry.name)
    return names
