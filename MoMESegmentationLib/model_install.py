"""Installing a model into the user's model store (``mome models install NAME [--file PATH]``).

:func:`install_model` takes every decision; the command line and the Slicer panel only call it
(the panel through ``PythonSlicer -m MoMESegmentationLib.cli models install NAME --yes
--progress-json``, watched by :class:`InstallJob`, so that neither the download nor PyTorch runs
in Slicer's process).

What can be installed:

* a registered model with a ``source_url`` and an importer (``universal-model``): downloaded
  (:func:`~MoMESegmentationLib.downloads.download_file`; weights on the Hugging Face Hub go to the
  Hugging Face cache, where they stay for the next installation), checked against the registry's
  SHA-256 when it has one, and converted; a finished download in ``<store>/downloads/`` (from
  ``mome models download``) is used instead of fetching it again;
* ``--file`` with the public weights (``.pth``/``.pt``, read with PyTorch's weights-only loader)
  of a registered model: converted;
* ``--file`` with a MoME checkpoint (``.safetensors`` beside its ``.json``, as
  :func:`~MoMESegmentationLib.checkpoint.save_checkpoint` writes them): loaded once to check it, then
  copied in, either as a registered model (its structures must be the registry's) or under a name
  of its own (``<store>/<NAME>/<NAME>.safetensors``; ``resolve_model(NAME)`` finds it).

A registered model's source and license are shown and must be accepted first (``ask``, or
``yes=True``); declining writes nothing.

Nothing is half-installed. Everything is written into a staging folder inside the store
(``<store>/.install-<pid>-<name>-<random>/``, on the same file system) and the model's folder is
moved into place with one rename at the very end; an earlier installation of the same model is
moved aside first and moved back if that rename fails. On any error or cancellation the staging
folder is removed and the store is as it was. A staging folder left by a killed process is removed
by the next installation.

This module imports neither PyTorch nor Qt at import time: the Slicer panel uses
:func:`plan_install`, :func:`model_choices`, :func:`suggest_install_name` and :class:`InstallJob`.
"""

from __future__ import annotations

import collections
import importlib
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .errors import Cancelled, CheckpointError, InputError, MoMEError
from .registry import ModelEntry, default_store, load_registry
from .worker_client import kill_tree

__all__ = [
    "InstallPlan",
    "ModelChoice",
    "InstallJob",
    "plan_install",
    "install_model",
    "model_choices",
    "suggest_install_name",
    "install_command",
    "STAGING_PREFIX",
]

logger = logging.getLogger(__name__)

#: Name prefix of staging folders inside the store (hidden; never listed as models).
STAGING_PREFIX = ".install-"
#: Files that are converted by the registry entry's importer.
WEIGHTS_SUFFIXES = (".pth", ".pt")
#: Files that are MoME checkpoints (the weights or their JSON description).
CHECKPOINT_SUFFIXES = (".safetensors", ".json")
#: Names a model may be installed under: a folder name on every platform.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RESERVED = {"downloads"}
#: Times a download that broke off is tried again within one installation.
DOWNLOAD_RETRIES = 3
#: Share of the progress bar the download takes (the rest: checks, conversion, the move).
_DOWNLOAD_SHARE = 0.8

Progress = Callable[[float, str, str], None]


def _importers() -> dict[str, str]:
    from .importers import IMPORTERS

    return IMPORTERS


# ---------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class InstallPlan:
    """What :func:`install_model` will do, decided without reading any weights.

    Attributes:
        name: the name the model is installed under (registry name or a name of its own).
        entry: the registry entry, or ``None`` for a checkpoint under a name of its own.
        action: ``"download"`` (fetch ``source_url`` and convert), ``"convert"`` (convert ``file``)
            or ``"copy"`` (check and copy the MoME checkpoint ``file``).
        file: the given file (a ``.json`` is replaced by its ``.safetensors``), or ``None``.
        target: the checkpoint's final path in the store.
        question: the source and license to accept before installing; ``None`` when there is nothing
            to accept (a checkpoint of the user's own).
        installed: a checkpoint is already at ``target``.
    """

    name: str
    entry: ModelEntry | None
    action: str
    file: Path | None
    target: Path
    question: str | None
    installed: bool

    @property
    def model_dir(self) -> Path:
        """The folder that is replaced as a whole: ``<store>/<folder>``."""
        return self.target.parent


def _question(entry: ModelEntry, action: str, file: Path | None, store: Path) -> str:
    from .downloads import describe_entry

    lines = [describe_entry(entry)]
    if action == "download":
        host = urlparse(entry.source_url).netloc or entry.source_url
        size = f" ({entry.source_size / 1e6:.0f} MB)" if entry.source_size else ""
        lines.append(f"Download {entry.source_file or 'the weights'}{size} from {host}, convert it into "
                     f"{store} and accept this license?")
    else:
        lines.append(f"Install {file.name if file else 'the file'} as '{entry.name}' into {store} "
                     "and accept this license?")
    return "\n".join(lines)


def plan_install(
    name: str,
    file: str | os.PathLike | None = None,
    *,
    store: str | os.PathLike | None = None,
    registry: dict[str, ModelEntry] | None = None,
) -> InstallPlan:
    """Check an installation request and say what it will do; reads no weights, imports no PyTorch.

    Args:
        name: a registry name, or (with a ``.safetensors`` ``file``) a new name for the user's checkpoint.
        file: a local file to install instead of downloading.
        store: the model store (default ``~/.mome/models``).
        registry: entries to use instead of ``Resources/models.json``.

    Raises:
        MoMEError: one line naming the model or file and the problem.
    """
    entries = registry if registry is not None else load_registry()
    root = Path(store).expanduser() if store is not None else default_store()
    name = str(name or "").strip()
    entry = entries.get(name)
    source = Path(file).expanduser() if file is not None else None
    importers = _importers()

    if source is not None:
        if not source.exists():
            raise InputError(f"{source}: file not found")
        if source.is_dir():
            raise InputError(
                f"{source}: is a folder; give the .pth/.pt weights or the .safetensors checkpoint"
            )
        suffix = source.suffix.lower()
        if suffix not in WEIGHTS_SUFFIXES + CHECKPOINT_SUFFIXES:
            raise InputError(
                f"{source}: not a model file (expected the public weights as .pth/.pt, or a MoME "
                ".safetensors checkpoint with its .json)"
            )
        if suffix == ".json":
            source = source.with_suffix(".safetensors")
            if not source.is_file():
                raise InputError(f"{source}: checkpoint weights not found beside its .json")

    if entry is not None:
        if entry.kind == "bundled":
            raise MoMEError(f"model '{name}' ships with MoMESegmentation; there is nothing to install")
        if not entry.is_segmentation_model:
            raise MoMEError(
                f"model '{name}' is a {entry.kind} for `mome train --init-backbone`, not a segmentation "
                f"model; get it with `mome models download {name}`"
            )
        target = entry.checkpoint_path(root)
        if target is None or len(Path(entry.checkpoint).parts) != 2 or target.suffix != ".safetensors":
            raise CheckpointError(
                f"model '{name}': the registry must place its checkpoint as FOLDER/FILE.safetensors "
                "in the store"
            )
        if source is None:
            if not entry.source_url:
                raise MoMEError(f"model '{name}' has no download address; install it with --file")
            if name not in importers:
                raise MoMEError(
                    f"model '{name}' has no converter for its download; install a checkpoint with --file"
                )
            action = "download"
        elif source.suffix.lower() in WEIGHTS_SUFFIXES:
            if name not in importers:
                raise InputError(f"{source}: model '{name}' has no converter for .pth/.pt files; "
                                 "give its MoME .safetensors checkpoint")
            action = "convert"
        else:
            action = "copy"
        question = _question(entry, action, source, root)
    else:
        if source is None:
            known = ", ".join(n for n, e in entries.items() if e.is_segmentation_model)
            raise MoMEError(
                f"unknown model '{name}': registered models are {known}; to add a checkpoint of your own "
                "under this name, pass --file CHECKPOINT.safetensors"
            )
        if source.suffix.lower() in WEIGHTS_SUFFIXES:
            convertible = ", ".join(n for n in importers if n in entries) or "none"
            raise InputError(
                f"{source}: .pth/.pt files are converted for a registered model ({convertible}), "
                f"not under the new name '{name}'"
            )
        if not _NAME.match(name) or name.lower() in _RESERVED:
            raise InputError(
                f"'{name}': a model name is 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                "or digit"
            )
        target = root / name / f"{name}.safetensors"
        action, question = "copy", None
    return InstallPlan(name, entry, action, source, target, question, target.is_file())


# ------------------------------------------------------------------------------------- install
def _check(cancel: Callable[[], bool] | None, name: str) -> None:
    if cancel is not None and cancel():
        raise Cancelled(f"installation of '{name}' cancelled; the model store was not changed")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if sys.platform == "win32":  # os.kill would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_staging(root: Path, max_age_s: float = 24 * 3600.0) -> None:
    """Remove staging folders of installations whose process is gone (or, on Windows, a day old)."""
    for folder in root.glob(f"{STAGING_PREFIX}*"):
        if not folder.is_dir():
            continue
        pid_text = folder.name[len(STAGING_PREFIX):].split("-", 1)[0]
        try:
            stale = not _pid_alive(int(pid_text))
        except ValueError:
            stale = False
        if sys.platform == "win32":
            try:
                stale = time.time() - folder.stat().st_mtime > max_age_s
            except OSError:
                stale = False
        if stale:
            logger.info("removing %s left by an interrupted installation", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _move_into_place(staged: Path, final: Path, staging: Path) -> None:
    """Put the staged model folder at ``final`` with one rename; an existing folder is moved aside
    first (into the staging folder, deleted with it) and moved back if the rename fails."""
    previous = None
    if final.exists() or final.is_symlink():
        previous = staging / "previous"
        os.replace(final, previous)
    try:
        os.replace(staged, final)
    except BaseException:
        if previous is not None:
            os.replace(previous, final)
        raise


def _download_source(plan: InstallPlan, root: Path, staging: Path, progress: Progress, timeout: float,
                     cancel: Callable[[], bool] | None, retries: int) -> Path:
    """The downloaded public weights: a finished file in ``<store>/downloads`` or a new download (for
    a Hub file: into the Hugging Face cache, linked from the staging folder; otherwise into the
    staging folder), tried up to ``retries`` more times after a broken connection."""
    from .downloads import DownloadInterrupted, download_file, downloads_dir, sha256_file

    entry = plan.entry
    assert entry is not None
    file_name = entry.source_file or Path(urlparse(entry.source_url).path).name or f"{plan.name}.pth"
    cached = downloads_dir(root) / file_name
    if cached.is_file() and (not entry.source_size or cached.stat().st_size == entry.source_size):
        progress(_DOWNLOAD_SHARE, "verify", f"using the earlier download {cached}")
        if entry.source_sha256:
            digest = sha256_file(cached)
            if digest != entry.source_sha256:
                raise CheckpointError(
                    f"{cached}: SHA-256 {digest[:12]}... is not the expected {entry.source_sha256[:12]}...; "
                    "delete it and install again"
                )
        return cached

    def report(done: int, total: int | None) -> None:
        total = total or entry.source_size or None
        fraction = _DOWNLOAD_SHARE * done / total if total else 0.0
        of = f" of {total / 1e6:.1f}" if total else ""
        progress(min(fraction, _DOWNLOAD_SHARE), "download", f"{done / 1e6:.1f}{of} MB")

    progress(0.0, "download", f"connecting to {urlparse(entry.source_url).netloc or entry.source_url}")
    destination = staging / "download" / file_name
    for attempt in range(retries + 1):
        try:
            result = download_file(entry.source_url, destination, expected_size=entry.source_size or None,
                                   expected_sha256=entry.source_sha256 or None, progress=False,
                                   timeout=timeout, on_progress=report, cancel=cancel)
            break
        except DownloadInterrupted as error:
            if attempt == retries:
                message = str(error).replace("run the same command again",
                                             f"gave up after {retries} more attempts")
                raise DownloadInterrupted(message) from None
            logger.info("%s; trying again", error)
            _check(cancel, plan.name)
    progress(_DOWNLOAD_SHARE, "verify", f"sha256 {result.sha256}")
    return result.path


def _convert(plan: InstallPlan, source: Path, staged: Path) -> None:
    module_name, function_name = _importers()[plan.name].split(":")
    convert = getattr(importlib.import_module(module_name), function_name)
    convert(source, staged)


def _copy_checkpoint(plan: InstallPlan, staged: Path) -> None:
    """Load the checkpoint once to check it, then copy it and its description into ``staged``."""
    from .checkpoint import load_checkpoint, read_checkpoint_meta
    from .downloads import sha256_file

    source = plan.file
    assert source is not None
    json_source = source.with_suffix(".json")
    if not json_source.is_file():
        raise CheckpointError(
            f"{source}: no {json_source.name} beside it; a MoME checkpoint is a .safetensors file with its "
            ".json description"
        )
    meta = read_checkpoint_meta(json_source)
    entry = plan.entry
    if entry is not None and entry.structures:
        have, want = set(map(str, meta["structures"])), set(entry.structures)
        if have != want:
            lacking, extra = sorted(want - have), sorted(have - want)
            detail = f"lacks {lacking[0]}" if lacking else f"also has {extra[0]}"
            raise CheckpointError(
                f"{source}: not a checkpoint of '{entry.name}': it segments {len(have)} structures, "
                f"the registry lists {len(want)} ({detail})"
            )
    load_checkpoint(source)  # the weights fit the architecture and match the SHA-256 in the .json
    shutil.copyfile(source, staged)
    if sha256_file(staged) != meta["weights"].get("sha256"):
        raise CheckpointError(f"{source}: changed while it was being copied; try again")
    meta["weights"]["file"] = staged.name  # the description names its weights file
    staged.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def install_model(
    name: str,
    file: str | os.PathLike | None = None,
    store: str | os.PathLike | None = None,
    yes: bool = False,
    ask: Callable[[str], bool] | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    *,
    force: bool = False,
    registry: dict[str, ModelEntry] | None = None,
    timeout: float | None = None,
    retries: int = DOWNLOAD_RETRIES,
) -> Path:
    """Install a model into the store: download and convert it, convert a local file, or copy a
    MoME checkpoint; atomically (see the module description).

    Args:
        name: registry name (``universal-model``), or a new name for a MoME checkpoint ``file``.
        file: a local ``.pth``/``.pt`` (the public weights) or ``.safetensors`` (a MoME checkpoint,
            its ``.json`` beside it); ``None`` downloads the registry's ``source_url``.
        store: the model store (default ``~/.mome/models``).
        yes: the license was accepted in advance; nothing is asked.
        ask: shows the source and license text and returns whether the user accepts (default: ask
            on the terminal, refusing without one).
        progress: ``progress(fraction, stage, message)``, stages ``download``, ``verify``,
            ``convert``, ``check``, ``install``, ``done``.
        cancel: polled between download blocks and between steps; true stops the installation.
        force: download and convert again although the model is installed (with ``file`` the
            installation is always replaced).
        registry: entries to use instead of ``Resources/models.json``.
        timeout: seconds without data before a download gives up (default 30).
        retries: times a download that broke off is tried again.

    Returns:
        The installed ``.safetensors`` checkpoint (``resolve_model(name, store)`` returns it too).

    Raises:
        MoMEError: one line naming the model or file and the problem; :class:`Cancelled` when the
            license was declined or ``cancel()`` returned true. The store is then as it was.
    """
    from .downloads import TIMEOUT_S

    report = progress or (lambda fraction, stage, message: None)
    plan = plan_install(name, file, store=store, registry=registry)
    root = plan.target.parent.parent
    if plan.action == "download" and plan.installed and not force:
        report(1.0, "done", f"already installed: {plan.target}")
        return plan.target
    if plan.question and not yes:
        if ask is None:
            from .downloads import _ask_terminal

            print(plan.question, file=sys.stderr)
            accepted = _ask_terminal("Accept? [y/N] ")
        else:
            accepted = ask(plan.question)
        if not accepted:
            raise Cancelled(
                f"installation of '{plan.name}' cancelled: the license was not accepted; nothing was written"
            )
    _check(cancel, plan.name)

    created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(root)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-{plan.name}-", dir=root))
    installed = False
    try:
        staged_dir = staging / plan.model_dir.name
        staged_dir.mkdir()
        staged = staged_dir / plan.target.name
        if plan.action == "copy":
            report(0.1, "check", f"checking {plan.file}")
            _copy_checkpoint(plan, staged)
        else:
            if plan.action == "download":
                source = _download_source(plan, root, staging, report, timeout or TIMEOUT_S, cancel, retries)
            else:
                source = plan.file
            _check(cancel, plan.name)
            report(0.85 if plan.action == "download" else 0.1, "convert", f"converting {source.name}")
            _convert(plan, source, staged)
        _check(cancel, plan.name)
        report(0.97, "install", f"moving into {plan.model_dir}")
        _move_into_place(staged_dir, plan.model_dir, staging)
        installed = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created_root and not installed:
            try:
                root.rmdir()  # only if this installation created it and left it empty
            except OSError:
                pass
    report(1.0, "done", f"installed {plan.name}: {plan.target}")
    logger.info("installed %s at %s", plan.name, plan.target)
    return plan.target


# ------------------------------------------------------------------------------ model selector
@dataclass(frozen=True)
class ModelChoice:
    """One row of a model selector.

    Attributes:
        name: what ``resolve_model`` and ``--model`` take.
        title: one-line human title.
        installed: its checkpoint is present.
        downloadable: ``install_model(name)`` can download and convert it.
        entry: its registry entry, or one describing a checkpoint installed under a name of its own
            (``kind="local"``).
    """

    name: str
    title: str
    installed: bool
    downloadable: bool
    entry: ModelEntry


def _read_description(json_path: Path) -> dict | None:
    """A checkpoint's JSON description when it looks like one (no PyTorch import, no weights read)."""
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != "mome-checkpoint":
        return None
    return meta


def model_choices(
    store: str | os.PathLike | None = None,
    registry: dict[str, ModelEntry] | None = None,
    resources: str | os.PathLike | None = None,
) -> list[ModelChoice]:
    """The segmentation models of the registry (installed or not), then the checkpoints installed
    under names of their own; reads JSON only (no PyTorch), so the Slicer panel may call it.

    Args:
        store: the model store (default ``~/.mome/models``).
        registry: entries to use instead of ``Resources/models.json``.
        resources: where bundled checkpoints are (default: the library's ``Resources/``).
    """
    entries = registry if registry is not None else load_registry()
    root = Path(store).expanduser() if store is not None else default_store()
    importers = _importers()
    choices: list[ModelChoice] = []
    taken: set[Path] = set()
    for entry in entries.values():
        if not entry.is_segmentation_model:
            continue
        path = entry.checkpoint_path(root, resources=resources)
        installed = path is not None and path.is_file()
        if path is not None:
            taken.add(path.resolve())
        downloadable = entry.kind != "bundled" and bool(entry.source_url) and entry.name in importers
        choices.append(ModelChoice(entry.name, entry.title, installed, downloadable, entry))
    local = []
    if root.is_dir():
        for json_path in sorted(root.glob("*/*.json")):
            weights = json_path.with_suffix(".safetensors")
            if json_path.parent.name.startswith(".") or not weights.is_file() or weights.resolve() in taken:
                continue
            if weights.stem in entries:
                continue
            meta = _read_description(json_path)
            if meta is None:
                continue
            provenance = meta.get("provenance") if isinstance(meta.get("provenance"), dict) else {}
            structures = meta.get("structures") if isinstance(meta.get("structures"), list) else []
            entry = ModelEntry(
                name=weights.stem,
                title=str(provenance.get("model") or weights.stem),
                kind="local",
                description=str(provenance.get("description", "")),
                license=str(provenance.get("license", "")),
                training_data=str(provenance.get("training_data", "")),
                structures=tuple(str(s) for s in structures),
                checkpoint=f"{json_path.parent.name}/{weights.name}",
            )
            local.append(ModelChoice(entry.name, entry.title, True, False, entry))
    return choices + sorted(local, key=lambda c: c.name)


def suggest_install_name(
    file: str | os.PathLike,
    selected: str | None = None,
    registry: dict[str, ModelEntry] | None = None,
) -> str:
    """The name to install a file under when the user only picked the file (the panel's
    "Add a checkpoint file..."); reads at most the checkpoint's JSON.

    * ``.pth``/``.pt``: the selected model when it has a converter, else the first registry model
      that has one (``universal-model``);
    * a MoME checkpoint: the registered model whose structures it has, else the file's name
      (its folder's when the file is called ``model``/``checkpoint``), made a valid name that is
      not a registered model's.
    """
    entries = registry if registry is not None else load_registry()
    path = Path(file).expanduser()
    importers = [n for n in _importers() if n in entries]
    if path.suffix.lower() in WEIGHTS_SUFFIXES:
        if selected in importers:
            return str(selected)
        return importers[0] if importers else path.stem
    is_checkpoint = path.suffix.lower() in CHECKPOINT_SUFFIXES
    meta = _read_description(path.with_suffix(".json")) if is_checkpoint else None
    if meta is not None and isinstance(meta.get("structures"), list):
        have = set(map(str, meta["structures"]))
        for entry in entries.values():
            if entry.kind == "imported" and entry.structures and set(entry.structures) == have:
                return entry.name
    stem = path.stem
    if stem.lower() in ("model", "checkpoint", "weights", "best", "last", "final") and path.parent.name:
        stem = path.parent.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")[:56] or "my-model"
    if name in entries or name.lower() in _RESERVED:
        name = f"{name}-local"
    return name


# ------------------------------------------------------------------------- background process
def install_command(python: str, name: str, file: str | os.PathLike | None = None,
                    store: str | os.PathLike | None = None) -> list[str]:
    """The command line that installs ``name`` in a child process with JSON progress lines (the
    license must have been accepted already: it passes ``--yes``)."""
    command = [python, "-m", "MoMESegmentationLib.cli", "models", "install", str(name),
               "--yes", "--progress-json"]
    if file is not None:
        command += ["--file", os.fspath(file)]
    if store is not None:
        command += ["--store", os.fspath(store)]
    return command


class InstallJob:
    """An installation running in a child process (see :func:`install_command`), watched without
    blocking: a ``QTimer`` calls :meth:`poll`.

    Reader threads queue the child's JSON lines (``progress``, ``done``, ``error``) and its stderr
    lines; :meth:`poll` hands them over on the caller's thread. :meth:`cancel` writes ``cancel`` to
    the child's stdin (it removes its staging folder and exits) and kills it when it has not ended
    ``cancel_grace_s`` seconds later.

    Attributes:
        name: the model being installed (for the caller's messages).
        state: ``"running"``, ``"done"``, ``"failed"`` or ``"cancelled"``.
        fraction, stage, message: the latest progress.
        path: the installed checkpoint (when done).
        error: one line (when failed).
    """

    def __init__(self, command: Sequence[str], env: dict[str, str] | None = None,
                 cwd: str | os.PathLike | None = None, cancel_grace_s: float = 10.0, name: str = "") -> None:
        if not command or not all(isinstance(part, str) and part for part in command):
            raise ValueError(f"command must be a non-empty list of strings, got {command!r}")
        self.name = name
        self.command = list(command)
        self.env = dict(env) if env is not None else None
        self.cwd = os.fspath(cwd) if cwd is not None else None
        self.cancel_grace_s = float(cancel_grace_s)
        self.state = "running"
        self.fraction = 0.0
        self.stage = ""
        self.message = ""
        self.path: str | None = None
        self.error: str | None = None
        self.returncode: int | None = None
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._stderr_tail: collections.deque = collections.deque(maxlen=20)
        self._error_event: str | None = None
        self._child_cancelled = False  # the child reported that it stopped on request
        self._killed = False
        self._cancel_at: float | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    def start(self) -> InstallJob:
        if sys.platform == "win32":
            group = {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0)
                     | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
        else:
            group = {"start_new_session": True}  # a kill reaches PythonSlicer's child interpreter too
        try:
            self._process = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=self.env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **group)
        except OSError as error:
            raise MoMEError(f"cannot start the installation ({self.command[0]}): {error}") from None
        for stream, kind in ((self._process.stdout, "stdout"), (self._process.stderr, "stderr")):
            thread = threading.Thread(target=self._read, args=(stream, kind), daemon=True,
                                      name=f"mome-install-{kind}")
            thread.start()
            self._threads.append(thread)
        return self

    def _read(self, stream, kind: str) -> None:
        try:
            for line in stream:
                self._lines.put((kind, line.rstrip("\r\n")))
        except (OSError, ValueError):
            pass
        self._lines.put((kind, None))

    def _drain(self) -> list[dict]:
        """The events parsed from the lines the reader threads queued so far."""
        events = []
        while True:
            try:
                kind, line = self._lines.get_nowait()
            except queue.Empty:
                return events
            if line is not None:
                events.append(self._parse(kind, line))

    def poll(self) -> list[dict]:
        """New events since the last call (never blocks): ``{"event": "progress"|"done"|"error"|"log", ...}``;
        the job's state is updated, and the last event of a finished job is ``{"event": "finished"}``."""
        if self._process is None or not self.running:
            return []
        events = self._drain()
        overdue = self._cancel_at is not None and time.monotonic() > self._cancel_at
        if overdue and self._process.poll() is None:
            logger.warning("installation process %d did not stop within %.0f s of cancel; killing it",
                           self._process.pid, self.cancel_grace_s)
            self._killed = True
            kill_tree(self._process)
        if self._process.poll() is not None and all(not t.is_alive() for t in self._threads):
            events += self._drain()  # what the readers queued before they ended
            self._finish(self._process.returncode)
            events.append({"event": "finished", "state": self.state})
        return events

    def _parse(self, kind: str, line: str) -> dict:
        if kind == "stdout" and line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and isinstance(event.get("event"), str):
                if event["event"] == "progress":
                    try:
                        self.fraction = max(0.0, min(1.0, float(event.get("fraction") or 0.0)))
                    except (TypeError, ValueError):
                        pass
                    self.stage = str(event.get("stage", ""))
                    self.message = str(event.get("message", ""))
                elif event["event"] == "done":
                    self.path = str(event.get("path", "")) or None
                elif event["event"] == "error":
                    self._error_event = str(event.get("message", "")) or None
                    self._child_cancelled = bool(event.get("cancelled"))
                return event
        if kind == "stderr" and line.strip():
            self._stderr_tail.append(line.strip())
        return {"event": "log", "text": line}

    def _finish(self, returncode: int) -> None:
        self.returncode = returncode
        for stream in (self._process.stdin, self._process.stdout, self._process.stderr):
            try:
                if stream is not None:
                    stream.close()
            except (OSError, ValueError):
                pass
        if returncode == 0 and self.path:
            self.state = "done"
            self.fraction = 1.0
        elif self._cancel_at is not None and (self._child_cancelled or self._killed):
            self.state = "cancelled"
        else:
            self.state = "failed"
            last = self._error_event or (self._stderr_tail[-1] if self._stderr_tail else "")
            last = last[len("mome: error: "):] if last.startswith("mome: error: ") else last
            self.error = last or f"the installation process ended with exit code {returncode}"

    def cancel(self) -> None:
        """Ask the child to stop (it cleans up); it is killed if still running after ``cancel_grace_s``."""
        if self._process is None or not self.running or self._cancel_at is not None:
            return
        self._cancel_at = time.monotonic() + self.cancel_grace_s
        try:
            self._process.stdin.write("cancel\n")
            self._process.stdin.flush()
        except (OSError, ValueError, AttributeError):
            self._killed = True
            kill_tree(self._process)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> str:
        """Poll until the job ends (for scripts and tests); returns the state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            self.poll()
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(interval)
        return self.state

    def __del__(self) -> None:  # never leave an orphan behind
        try:
            if self._process is not None and self._process.poll() is None:
                kill_tree(self._process)
        except Exception:
            pass
