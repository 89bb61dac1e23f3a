"""Downloading public weights, only when the user asks (``mome models download NAME``).

Before anything is fetched the user sees the model's license and source and confirms
(``--yes`` confirms in advance). Downloads go to ``<store>/downloads/<file>`` through a
``.part`` file that is resumed with an HTTP ``Range`` request after an interruption, show a
tqdm progress bar (or call a progress callback), can be cancelled between blocks, check the
expected size and SHA-256 when the registry knows them, and end with the file's SHA-256. Only
the standard library's ``urllib`` and ``hashlib`` are used (no PyTorch import). Without a network
the user gets one line saying so and how to continue with a file brought by other means
(``mome import`` and ``mome models install NAME --file FILE`` work offline).

``mome models install NAME`` (:mod:`.model_install`) downloads with :func:`download_file` too.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .errors import Cancelled, MoMEError
from .registry import ModelEntry, default_store, get_entry, load_registry

__all__ = [
    "DownloadResult",
    "DownloadInterrupted",
    "download_file",
    "download_model",
    "downloads_dir",
    "describe_entry",
    "sha256_file",
]

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT_S = 30.0
USER_AGENT = "MoMESegmentation (urllib)"


class DownloadInterrupted(MoMEError):
    """The connection broke off before the whole file arrived; the ``.part`` file can be resumed."""


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
        path: the complete file.
        sha256: its SHA-256 (hex).
        bytes: its size.
        resumed_from: bytes already present in the ``.part`` file when this download started.
        downloaded: bytes transferred in this call (0 when the file was already complete).
    """

    path: Path
    sha256: str
    bytes: int
    resumed_from: int = 0
    downloaded: int = 0


def downloads_dir(store: Path | None = None) -> Path:
    """Where downloaded source files are kept: ``<store>/downloads``."""
    return (Path(store) if store is not None else default_store()) / "downloads"


def _offline_error(url: str, reason: object) -> MoMEError:
    host = urlparse(url).netloc or url
    text = " ".join(str(getattr(reason, "strerror", None) or reason).split())
    return MoMEError(
        f"cannot reach {host} ({text}): no network connection? Download {url} another way and "
        f"pass the file to `mome import`"
    )


def _parse_total(response, offset: int) -> int | None:
    """Full file size from ``Content-Range`` (206) or ``Content-Length`` (200)."""
    content_range = response.headers.get("Content-Range", "")
    if "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        if total.isdigit():
            return int(total)
    length = response.headers.get("Content-Length")
    if length and length.isdigit():
        return int(length) + (offset if response.status == 206 else 0)
    return None


def download_file(
    url: str,
    destination: str | os.PathLike,
    *,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    progress: bool = True,
    timeout: float = TIMEOUT_S,
    on_progress: Callable[[int, int | None], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> DownloadResult:
    """Download ``url`` to ``destination`` through ``destination.part``, resuming a partial file.

    Args:
        url: ``http(s)://`` address.
        destination: the final file; an existing complete file (right size) is not downloaded again.
        expected_size: bytes the file must have (``None``/0: unknown).
        expected_sha256: hex digest the file must have (``None``: not checked). On a mismatch the
            partial file is removed.
        progress: show a tqdm bar on stderr.
        timeout: seconds without data before giving up.
        on_progress: called with ``(bytes so far, total bytes or None)`` after each block.
        cancel: polled after each block; when it returns true the download stops with
            :class:`~MoMESegmentationLib.errors.Cancelled` (the ``.part`` file stays, so it can be resumed).

    Returns:
        :class:`DownloadResult`.

    Raises:
        DownloadInterrupted: the connection broke off (run again to resume).
        Cancelled: ``cancel()`` returned true.
        MoMEError: one line for no network, HTTP errors, size or checksum mismatch.
    """
    dest = Path(destination).expanduser()
    part = dest.with_name(dest.name + ".part")
    expected_size = int(expected_size) if expected_size else None
    if dest.is_file() and (expected_size is None or dest.stat().st_size == expected_size):
        digest = sha256_file(dest)
        if expected_sha256 and digest != expected_sha256.lower():
            raise MoMEError(
                f"{dest}: SHA-256 {digest[:12]}... is not the expected {expected_sha256[:12]}...; "
                f"delete it and download again"
            )
        return DownloadResult(dest, digest, dest.stat().st_size)
    dest.parent.mkdir(parents=True, exist_ok=True)

    offset = part.stat().st_size if part.is_file() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    resumed_from = offset
    written = 0
    if expected_size is None or offset < expected_size:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as error:
            if error.code == 416 and offset and (expected_size is None or offset == expected_size):
                response = None  # the .part file already holds everything
            else:
                raise MoMEError(f"{url}: download failed (HTTP {error.code} {error.reason})") from None
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as error:
            raise _offline_error(url, getattr(error, "reason", error)) from None
        if response is not None:
            with response:
                if offset and response.status != 206:
                    logger.info("%s: server ignored the range request; starting again", url)
                    offset = resumed_from = 0
                total = _parse_total(response, offset) or expected_size
                if expected_size is not None and total is not None and total != expected_size:
                    raise MoMEError(
                        f"{url}: server reports {total} bytes, expected {expected_size}; "
                        "the file changed upstream or the address is wrong"
                    )
                written = _stream(response, part, offset, total, progress, dest.name, url,
                                  on_progress, cancel)
                if total is not None and offset + written < total:
                    raise DownloadInterrupted(
                        f"{url}: connection lost after {offset + written} of {total} bytes; "
                        "run the same command again to resume"
                    )

    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        error = DownloadInterrupted if size < expected_size else MoMEError
        raise error(
            f"{part}: got {size} bytes, expected {expected_size}; run the same command again to resume"
        )
    digest = sha256_file(part)
    if expected_sha256 and digest != expected_sha256.lower():
        part.unlink()
        raise MoMEError(
            f"{url}: SHA-256 {digest[:12]}... is not the expected {expected_sha256[:12]}...; "
            "the partial file was removed, download again"
        )
    os.replace(part, dest)
    return DownloadResult(dest, digest, size, resumed_from=resumed_from, downloaded=written)


def _stream(
    response,
    part: Path,
    offset: int,
    total: int | None,
    progress: bool,
    label: str,
    url: str,
    on_progress: Callable[[int, int | None], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> int:
    from tqdm import tqdm

    # read1 returns what has arrived (up to CHUNK) instead of waiting for a whole block, so that
    # progress and cancellation stay responsive on slow connections.
    read = getattr(response, "read1", response.read)
    mode = "ab" if offset else "wb"
    written = 0
    with (
        open(part, mode) as f,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            disable=not progress,
            file=sys.stderr,
            leave=False,
        ) as bar,
    ):
        while True:
            if cancel is not None and cancel():
                raise Cancelled(f"{url}: download cancelled after {offset + written} bytes")
            try:
                block = read(CHUNK)
            except (TimeoutError, OSError, http.client.HTTPException) as error:
                reason = type(error).__name__ if not str(error) else " ".join(str(error).split())[:80]
                raise DownloadInterrupted(
                    f"{url}: connection lost after {offset + written} bytes ({reason}); "
                    "run the same command again to resume"
                ) from None
            if not block:
                break
            f.write(block)
            written += len(block)
            bar.update(len(block))
            if on_progress is not None:
                on_progress(offset + written, total)
    return written


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
        store: model store (default ``~/.mome/models``); files go to ``<store>/downloads``.
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
    file_name = entry.source_file or Path(urlparse(entry.source_url).path).name
    destination = downloads_dir(Path(store) if store is not None else None) / file_name
    say(describe_entry(entry))
    if not yes:
        ask = confirm or _ask_terminal
        if not ask(f"Download {file_name} to {destination.parent} and accept this license? [y/N] "):
            raise MoMEError(f"download of '{name}' cancelled: the license was not accepted")
    expected_sha = entry.source_sha256 or None
    result = download_file(
        entry.source_url,
        destination,
        expected_size=entry.source_size or None,
        expected_sha256=expected_sha,
        progress=progress,
    )
    note = f" (resumed at {result.resumed_from} bytes)" if result.resumed_from else ""
    say(f"{result.path}: {result.bytes} bytes{note}")
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
