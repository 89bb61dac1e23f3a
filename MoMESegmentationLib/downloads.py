"""Downloading public weights, only when the user asks (``mome models download NAME``).

The user first sees the model's license and source and confirms (``--yes`` confirms in advance).
The transfer is the field's libraries' work (docs/REAL_WEIGHTS.md tells users where files go):

* **Hugging Face Hub files** (``https://huggingface.co/ORG/REPO/resolve/REVISION/FILE``: the
  Universal Model): ``huggingface_hub.hf_hub_download`` into the Hugging Face cache
  (``HF_HUB_CACHE``, shared with other programs; ``HF_ENDPOINT``, ``HF_TOKEN`` and
  ``HF_HUB_OFFLINE`` apply), with ``<store>/downloads/FILE`` a symbolic link to the cached file
  where links can be made. A broken connection is resumed within the run; huggingface_hub keeps no
  partial file between runs. The file is checked against the Hub's SHA-256 (a large file's ETag).
* **Other addresses** (the MONAI backbones on GitHub): ``monai.apps.download_url`` into
  ``<store>/downloads/FILE``; no resuming, its own progress bar.

Both end with the file's SHA-256, checked against the registry's ``source_sha256`` when it has one;
a complete file in ``<store>/downloads`` is not fetched again; without a network the user gets one
line saying so and how to continue offline (``mome import``, ``mome models install NAME --file``).
Neither library is imported before a download starts. :mod:`.model_install` downloads with
:func:`download_file` too.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
import urllib.error
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .errors import Cancelled, MoMEError
from .registry import ModelEntry, default_store, get_entry, load_registry

__all__ = [
    "DownloadResult",
    "DownloadInterrupted",
    "HubFile",
    "download_file",
    "download_model",
    "downloads_dir",
    "describe_entry",
    "hub_file",
    "sha256_file",
]

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
#: Seconds to wait for the Hub to answer before giving up (the HEAD request that resolves a file).
TIMEOUT_S = 30.0
HUB = "https://huggingface.co"


class DownloadInterrupted(MoMEError):
    """The connection broke off before the whole file arrived (run the command again)."""


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class DownloadResult:
    """A finished download.

    Attributes:
        path: the complete file (for Hub files: the link in the store, or the cached file).
        sha256: its SHA-256 (hex).
        bytes: its size.
        downloaded: bytes transferred in this call (0 when the file was already there).
        cache: for Hub files, the file in the Hugging Face cache; otherwise ``None``.
    """

    path: Path
    sha256: str
    bytes: int
    downloaded: int = 0
    cache: Path | None = None


@dataclass(frozen=True)
class HubFile:
    """A file on a Hugging Face Hub: ``{endpoint}/{repo_id}/resolve/{revision}/{filename}``."""

    endpoint: str
    repo_id: str
    revision: str
    filename: str


def hub_file(url: str) -> HubFile | None:
    """The Hub file a ``source_url`` names, or ``None`` for an address off the Hub.

    Addresses on ``huggingface.co`` or on the endpoint in ``HF_ENDPOINT`` count; the file is
    fetched from ``HF_ENDPOINT`` when it is set (a mirror), else from ``huggingface.co``.
    """
    endpoint = (os.environ.get("HF_ENDPOINT") or HUB).rstrip("/")
    parts = urlsplit(url)
    if f"{parts.scheme}://{parts.netloc}" not in (HUB, endpoint):
        return None
    match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", parts.path)
    if not match:
        return None
    repo_id, revision, filename = match.groups()
    return HubFile(endpoint, repo_id, unquote(revision), unquote(filename))


def downloads_dir(store: Path | None = None) -> Path:
    """Where downloaded source files are kept (or linked): ``<store>/downloads``."""
    return (Path(store) if store is not None else default_store()) / "downloads"


def _text(reason: object, limit: int = 120) -> str:
    """A reason as one short line."""
    text = str(getattr(reason, "strerror", None) or getattr(reason, "reason", None) or reason)
    return " ".join(text.split())[:limit] or type(reason).__name__


def _offline_error(url: str, reason: object) -> MoMEError:
    return MoMEError(f"cannot reach {urlsplit(url).netloc or url} ({_text(reason)}): no network connection? "
                     f"Download {url} another way and pass the file to `mome import`")


def _broke_off(url: str, reason: object) -> DownloadInterrupted:
    return DownloadInterrupted(f"{url}: download broke off ({_text(reason)}); run the same command again")


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Keep the libraries' own log lines (retries, "Downloaded: ...") off the terminal: the user
    gets one line from us; stdout stays free for ``--progress-json``."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for each, level in zip(loggers, levels):
            each.setLevel(level)


def _progress_bar(show: bool, label: str, url: str, on_progress: Callable[[int, int | None], None] | None,
                  cancel: Callable[[], bool] | None, moved: list[int]):
    """A tqdm class for huggingface_hub: draws the bar (when ``show``), reports each block to
    ``on_progress``, stops with :class:`Cancelled` when ``cancel()`` is true, counts in ``moved``."""
    from tqdm import tqdm

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.update(disable=not show, file=sys.stderr, leave=False, unit_divisor=1024, desc=label)
            super().__init__(*args, **kwargs)
            self.done = int(kwargs.get("initial") or 0)

        def update(self, n=1):
            if cancel is not None and cancel():
                raise Cancelled(f"{url}: download cancelled after {self.done} bytes")
            self.done += n
            moved[0] += n
            if on_progress is not None:
                on_progress(self.done, self.total)
            return super().update(n)

    return Bar


def _from_hub(hub: HubFile, url: str, destination: Path, *, progress: bool, timeout: float | None,
              on_progress, cancel) -> DownloadResult:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    moved = [0]
    bar = _progress_bar(progress, destination.name, url, on_progress, cancel, moved)
    try:
        with _quiet("huggingface_hub"):
            cached = Path(hf_hub_download(hub.repo_id, hub.filename, revision=hub.revision,
                                          endpoint=hub.endpoint, etag_timeout=timeout or TIMEOUT_S,
                                          tqdm_class=bar, library_name="MoMESegmentation"))
    except (Cancelled, KeyboardInterrupt):
        raise
    except (LocalEntryNotFoundError, HfHubHTTPError) as error:
        # LocalEntryNotFoundError: the Hub could not be asked (its cause says why), nothing is cached
        cause = error.__cause__ if isinstance(error, LocalEntryNotFoundError) else error
        if isinstance(cause, OfflineModeIsEnabled):
            raise MoMEError(f"{url}: not in the Hugging Face cache and HF_HUB_OFFLINE is set; unset it "
                            "to download, or download the file another way and pass it to `mome import`"
                            ) from None
        response = getattr(cause, "response", None) if isinstance(cause, HfHubHTTPError) else None
        if response is None:
            raise _offline_error(url, cause or error) from None
        status = f"HTTP {response.status_code} {response.reason_phrase}"
        raise MoMEError(f"{url}: download failed ({status})") from None
    except Exception as error:  # the transfer broke off after huggingface_hub's own retries
        logger.debug("download of %s failed", url, exc_info=True)
        raise _broke_off(url, error) from None
    if cancel is not None and cancel():
        raise Cancelled(f"{url}: download cancelled")
    digest = sha256_file(cached)
    blob = cached.resolve()
    if re.fullmatch(r"[0-9a-f]{64}", blob.name) and digest != blob.name:  # large files: ETag = SHA-256
        blob.unlink(missing_ok=True)
        cached.unlink(missing_ok=True)
        raise MoMEError(f"{url}: SHA-256 {digest[:12]}... is not the Hub's {blob.name[:12]}...; the cached "
                        "file was removed, download again")
    path = cached
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        if destination.is_symlink() or destination.exists():
            destination.unlink()
        destination.symlink_to(cached)
        path = destination
    except OSError as error:  # no links on this file system: use the cached file where it is
        logger.info("cannot link %s to %s (%s); using the cached file", destination, cached, error)
    return DownloadResult(path, digest, cached.stat().st_size, downloaded=moved[0], cache=cached)


def _from_url(url: str, destination: Path, *, expected_sha256: str | None, progress: bool,
              cancel) -> DownloadResult:
    from monai.apps.utils import HashCheckError, download_url

    if cancel is not None and cancel():
        raise Cancelled(f"{url}: download cancelled")
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet("monai.apps"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "No hash value provided")  # the SHA-256 is printed anyway
            download_url(url, destination, hash_val=expected_sha256 or None, hash_type="sha256",
                         progress=progress)
    except HashCheckError:
        raise MoMEError(f"{url}: SHA-256 is not the expected {expected_sha256[:12]}...; the file was not "
                        "kept, download again") from None
    except urllib.error.HTTPError as error:
        raise MoMEError(f"{url}: download failed (HTTP {error.code} {error.reason})") from None
    except urllib.error.ContentTooShortError as error:
        raise _broke_off(url, error) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        raise _offline_error(url, getattr(error, "reason", error)) from None
    if not destination.is_file():  # download_url says nothing when it cannot write the file
        raise MoMEError(f"{destination}: the download could not be written there")
    size = destination.stat().st_size
    return DownloadResult(destination, sha256_file(destination), size, downloaded=size)


def download_file(
    url: str,
    destination: str | os.PathLike,
    *,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    progress: bool = True,
    timeout: float | None = None,
    on_progress: Callable[[int, int | None], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> DownloadResult:
    """Download ``url`` so that ``destination`` holds the file (or, for a Hub file, links to it).

    Args:
        url: a Hub file (see :func:`hub_file`), fetched into the Hugging Face cache; or any other
            ``http(s)://`` address, fetched with MONAI's ``download_url``.
        destination: the file in the store; an existing complete file (right size) is not
            downloaded again; a new one that fails the checks below is removed.
        expected_size: bytes the file must have (``None``/0: unknown).
        expected_sha256: hex digest the file must have (``None``: not checked).
        progress: show a progress bar on stderr.
        timeout: seconds to wait for the Hub to answer (default 30); the transfer's own timeout
            is ``HF_HUB_DOWNLOAD_TIMEOUT``.
        on_progress: called with ``(bytes so far, total bytes or None)`` for each block of a Hub
            download (off the Hub: once, at the end).
        cancel: polled between blocks of a Hub download (off the Hub: before it starts); when it
            returns true the download stops with :class:`~MoMESegmentationLib.errors.Cancelled`.

    Returns:
        :class:`DownloadResult`.

    Raises:
        DownloadInterrupted: the connection broke off (run again).
        Cancelled: ``cancel()`` returned true.
        MoMEError: one line for no network, HTTP errors, size or checksum mismatch.
    """
    dest = Path(destination).expanduser()
    expected_size = int(expected_size) if expected_size else None
    expected_sha256 = expected_sha256.lower() if expected_sha256 else None
    present = dest.is_file() and (expected_size is None or dest.stat().st_size == expected_size)
    if present:
        result = DownloadResult(dest, sha256_file(dest), dest.stat().st_size,
                                cache=dest.resolve() if dest.is_symlink() else None)
    elif (hub := hub_file(url)) is not None:
        result = _from_hub(hub, url, dest, progress=progress, timeout=timeout, on_progress=on_progress,
                           cancel=cancel)
    else:
        result = _from_url(url, dest, expected_sha256=expected_sha256, progress=progress, cancel=cancel)
        if on_progress is not None:
            on_progress(result.bytes, result.bytes)
    problem = None
    if expected_size is not None and result.bytes != expected_size:
        problem = f"got {result.bytes} bytes, expected {expected_size}"
    elif expected_sha256 and result.sha256 != expected_sha256:
        problem = f"SHA-256 {result.sha256[:12]}... is not the expected {expected_sha256[:12]}..."
    if problem:
        if not present and result.path == dest:  # what was just written (a Hub file stays in its cache)
            dest.unlink(missing_ok=True)
        raise MoMEError(f"{url}: {problem}; the file changed upstream or the registry is wrong")
    return result


def describe_entry(entry: ModelEntry) -> str:
    """What the user reads before accepting a model's license: title, source, license, data, use."""
    lines = [
        f"{entry.title}",
        f"  source:   {entry.source_url}",
        f"  license:  {entry.license or 'not stated'}",
    ]
    if entry.training_data:
        lines.append(f"  data:     {entry.training_data}")
    if entry.intended_use:
        lines.append(f"  use:      {entry.intended_use}")
    if entry.source_size:
        lines.append(f"  size:     {entry.source_size / 1e6:.0f} MB")
    return "\n".join(lines)


def _ask_terminal(question: str) -> bool:
    if not sys.stdin or not sys.stdin.isatty():
        raise MoMEError(
            "cannot ask for confirmation (no terminal); read the license above and pass --yes to accept it"
        )
    answer = input(question)
    return answer.strip().lower() in ("y", "yes")


def download_model(
    name: str,
    store: str | os.PathLike | None = None,
    yes: bool = False,
    *,
    registry: dict[str, ModelEntry] | None = None,
    confirm: Callable[[str], bool] | None = None,
    echo: Callable[[str], None] | None = None,
    progress: bool = True,
) -> Path:
    """Download a registered model's public weights after the user accepts its license.

    Args:
        name: registry name (``universal-model``, ``monai-swinvit-ssl``, ``monai-swin-unetr-base``).
        store: model store (default ``~/.mome/models``); files go to (or are linked from)
            ``<store>/downloads``.
        yes: the license was accepted in advance (``--yes``); no question is asked.
        registry: entries to use instead of ``Resources/models.json``.
        confirm: asks a yes/no question (default: the terminal; refuses without one).
        echo: shows a message to the user (default: standard error).
        progress: show a progress bar.

    Returns:
        The downloaded file.

    Raises:
        MoMEError: unknown model, nothing to download, declined license, network or size problems.
    """
    say = echo or (lambda text: print(text, file=sys.stderr))
    entries = registry if registry is not None else load_registry()
    entry = get_entry(name, entries)
    if not entry.source_url:
        raise MoMEError(
            f"model '{name}' has nothing to download ({entry.kind}; it ships with MoMESegmentation)"
        )
    file_name = entry.source_file or Path(urlsplit(entry.source_url).path).name
    destination = downloads_dir(Path(store) if store is not None else None) / file_name
    say(describe_entry(entry))
    if not yes:
        ask = confirm or _ask_terminal
        where = "the Hugging Face cache" if hub_file(entry.source_url) else str(destination.parent)
        if not ask(f"Download {file_name} to {where} and accept this license? [y/N] "):
            raise MoMEError(f"download of '{name}' cancelled: the license was not accepted")
    result = download_file(
        entry.source_url,
        destination,
        expected_size=entry.source_size or None,
        expected_sha256=entry.source_sha256 or None,
        progress=progress,
    )
    say(f"{result.path}: {result.bytes} bytes")
    if result.cache is not None and result.cache != result.path:
        say(f"  (a link to {result.cache} in the Hugging Face cache)")
    say(f"sha256 {result.sha256}")
    if entry.import_command:
        command = entry.import_command.replace(file_name, str(result.path))
        if store is not None:
            command += f" --store {store}"
        say(f"next: {command}")
        say(f"or: mome models install {name}" + (f" --store {store}" if store is not None else "")
            + " (converts the downloaded file into the model store)")
    elif entry.kind == "backbone":
        say(f"next: mome train CONFIG --init-backbone {result.path}")
    return result.path
