"""``mome serve``: segmentation over HTTP for clients without a GPU (the Slicer module, ``mome segment
--server``).

The protocol (all JSON, plus image and result file bytes; OpenAPI docs at ``/docs``)::

    GET    /health                          no key: {"status": "ok", "version"}
    GET    /v1/info                         model, structures, devices, limits
    POST   /v1/sessions?format=nrrd         body: the image file (NRRD, NIfTI or MHA with its
                                            geometry), gzip'd with Content-Encoding: gzip or not
                                            -> 201 {"session", "sha256", "shape", "idle_timeout_s"}
    DELETE /v1/sessions/{session}           the upload and its results are deleted
    POST   /v1/sessions/{session}/jobs      {"prompts", "options", "format"} -> 202 {"job", "state"}
    GET    /v1/jobs/{job}/events?since=N&wait=S
                                            progress, then done / error / cancelled (long poll)
    GET    /v1/jobs/{job}                   the job's state, summary and result files
    POST   /v1/jobs/{job}/cancel            stops the job at its next window
    GET    /v1/jobs/{job}/files/{name}      a result file (the .seg.nrrd, probability maps)

Every ``/v1`` route needs ``Authorization: Bearer KEY`` when the server has a key, and the server
refuses to listen on anything but a loopback address without one. A session is one uploaded image;
prompts are jobs on it, and the engine's image features of the most recently used sessions are kept
(bounded in count and bytes), so a new prompt on an uploaded image skips the image encoder. Each
device runs one job at a time from a bounded queue (429 when full). Uploads and results live only
inside the server's work folder, only as long as their session (an idle timeout ends it).

Errors are HTTP statuses with a one-line ``{"detail": message}``: 401 (key), 404 (no such session or
job: expired or never made), 413 (upload, decompressed image or voxel count over the limit), 400
(not an image), 422 (malformed request, too many prompts), 429 (queue full), 503 (shutting down).
"""

import argparse
import asyncio
import collections
import dataclasses
import gzip
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import queue
import re
import secrets
import shutil
import tempfile
import threading
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

from . import __version__
from .errors import Cancelled, InputError, MoMEError

__all__ = [
    "ServerConfig",
    "SegmentationService",
    "create_app",
    "is_loopback",
    "register",
    "run_server",
    "UPLOAD_FORMATS",
]

logger = logging.getLogger(__name__)

#: What ``POST /v1/sessions?format=`` accepts: single-file image formats that carry their geometry.
UPLOAD_FORMATS = {"nrrd": ".nrrd", "nii": ".nii", "nii.gz": ".nii.gz", "mha": ".mha"}
#: Result formats a job may ask for (``format`` of a job request).
RESULT_FORMATS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd")
#: Largest JSON body of any request other than an upload.
JSON_BODY_LIMIT = 256 * 1024
#: Longest a client may ask ``/events`` to wait for news.
MAX_WAIT_S = 10.0

_ID = re.compile(r"^[0-9a-f]{32}$")


class ServiceError(Exception):
    """A request the service refuses: becomes an HTTP error with a one-line message."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())
        self.headers = headers or {}


@dataclasses.dataclass
class ServerConfig:
    """What ``mome serve`` runs with; every limit is enforced with a clear HTTP error."""

    model: str | None = None  # registry name or checkpoint path (None: demo)
    devices: tuple[str, ...] = ("auto",)  # one worker thread and one Segmenter per entry
    threads: int | None = None  # CPU threads for torch
    api_key: str | None = None  # None: no key (loopback only)
    work_dir: Path | None = None  # uploads and results (None: a fresh temp folder, removed on exit)
    max_upload_bytes: int = 1 << 30  # bytes on the wire per upload (413)
    max_image_bytes: int = 4 << 30  # bytes after decompression (413)
    max_voxels: int = 512 * 512 * 1500  # voxels per image (413)
    max_prompts: int = 32  # prompts per job (422)
    max_queue: int = 16  # jobs waiting per device (429)
    max_sessions: int = 64  # uploaded images kept at once (429)
    cache_sessions: int = 4  # images whose features stay cached, per device
    cache_bytes: int = 8 << 30  # bytes of cached features and images, per device
    idle_timeout_s: float = 1800.0  # a session unused this long is deleted
    job_timeout_s: float | None = 1800.0  # a job running longer is stopped with an error (None: no limit)
    keep_jobs: int = 8  # finished jobs (and their result files) kept per session

    def __post_init__(self) -> None:
        for name in (
            "max_upload_bytes",
            "max_image_bytes",
            "max_voxels",
            "max_prompts",
            "max_queue",
            "max_sessions",
            "keep_jobs",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.cache_sessions < 0 or self.cache_bytes < 0:
            raise ValueError("cache_sessions and cache_bytes must not be negative")
        if self.idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s must be positive, got {self.idle_timeout_s}")
        if self.job_timeout_s is not None and self.job_timeout_s <= 0:
            raise ValueError(f"job_timeout_s must be positive or None, got {self.job_timeout_s}")
        if not self.devices:
            raise ValueError("at least one device is needed")
        if self.api_key is not None and not self.api_key.strip():
            self.api_key = None

    def limits(self) -> dict:
        return {
            "max_upload_bytes": self.max_upload_bytes,
            "max_image_bytes": self.max_image_bytes,
            "max_voxels": self.max_voxels,
            "max_prompts": self.max_prompts,
            "max_queue": self.max_queue,
            "max_sessions": self.max_sessions,
            "idle_timeout_s": self.idle_timeout_s,
            "job_timeout_s": self.job_timeout_s,
            "upload_formats": sorted(UPLOAD_FORMATS),
            "result_formats": list(RESULT_FORMATS),
        }


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    host = str(host).strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line[:limit]


def _error_kind(error: BaseException) -> str:
    from .worker import _error_kind as kind

    return kind(error)


# ------------------------------------------------------------------------------------------
# Sessions, jobs and the per-device feature caches
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Session:
    id: str
    folder: Path
    image: Path
    sha256: str
    shape: tuple[int, ...]
    device: int  # index of the worker that runs its jobs (its features live there)
    created: float = dataclasses.field(default_factory=time.monotonic)
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    jobs: list[str] = dataclasses.field(default_factory=list)
    closed: bool = False


class Job:
    """One prompt set on one session, with its events (a bounded log with sequence numbers)."""

    TERMINAL = ("done", "error", "cancelled")

    def __init__(self, job_id: str, session: Session, prompts: str, options: dict, fmt: str) -> None:
        from .engine import CancelToken

        self.id = job_id
        self.session = session
        self.prompts = prompts
        self.options = options
        self.format = fmt
        self.folder = session.folder / "jobs" / job_id
        self.token = CancelToken()
        self.state = "queued"
        self.summary: dict | None = None
        self.files: list[str] = []
        self.error = ""
        self.error_kind = ""
        self.timed_out = False
        self.created = time.monotonic()
        self.started: float | None = None
        self.finished: float | None = None
        self._events: collections.deque = collections.deque(maxlen=500)
        self._seq = 0
        self._last_progress = 0.0
        self.changed = threading.Condition()

    @property
    def terminal(self) -> bool:
        return self.state in self.TERMINAL

    def emit(self, event: str, **fields) -> None:
        with self.changed:
            self._seq += 1
            self._events.append({"seq": self._seq, "event": event, **fields})
            self.changed.notify_all()

    def progress(self, fraction: float, stage: str, message: str) -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self._last_progress < 0.05:  # at most 20 a second
            return
        self._last_progress = now
        self.emit("progress", fraction=round(float(fraction), 4), stage=str(stage), message=str(message))

    def finish(self, state: str, **fields) -> None:
        with self.changed:
            if self.terminal:
                return
            self.state = state
            self.finished = time.monotonic()
        self.emit(state, **fields)

    def events_since(self, since: int, wait: float) -> list[dict]:
        deadline = time.monotonic() + max(0.0, wait)
        with self.changed:
            while True:
                events = [e for e in self._events if e["seq"] > since]
                remaining = deadline - time.monotonic()
                if events or self.terminal or remaining <= 0:
                    return events
                self.changed.wait(remaining)

    def status(self) -> dict:
        return {
            "job": self.id,
            "session": self.session.id,
            "state": self.state,
            "prompts": self.prompts,
            "summary": self.summary,
            "files": list(self.files),
            "error": self.error or None,
            "kind": self.error_kind or None,
            "last_event": self._seq,
        }


class _CacheEntry:
    def __init__(self, features: Any) -> None:
        self.features = features
        self.volume = None

    @property
    def nbytes(self) -> int:
        size = int(getattr(self.features, "nbytes", 0) or 0)
        if self.volume is not None:
            size += int(getattr(self.volume.array, "nbytes", 0))
        return size


class _Device:
    """One Segmenter on one device, its worker thread, its queue and its LRU of session features."""

    def __init__(self, index: int, segmenter, config: ServerConfig, service: "SegmentationService") -> None:
        self.index = index
        self.segmenter = segmenter
        self.config = config
        self.service = service
        self.queue: queue.Queue = queue.Queue()
        self.waiting = 0  # jobs queued and not cancelled
        self.running: Job | None = None
        self.cache: collections.OrderedDict = collections.OrderedDict()
        self.thread = threading.Thread(target=self._run, name=f"mome-serve-device-{index}", daemon=True)

    @property
    def name(self) -> str:
        return str(getattr(self.segmenter, "device", "cpu"))

    # -- the feature cache ------------------------------------------------------------
    @staticmethod
    def _new_features():
        from .engine import FeatureCache

        return FeatureCache()

    def _entry(self, session_id: str) -> _CacheEntry:
        entry = self.cache.pop(session_id, None)
        if entry is None:
            entry = _CacheEntry(self._new_features())
        self.cache[session_id] = entry  # most recently used last
        return entry

    def _trim(self) -> None:
        """Evict least recently used sessions until within the count and byte limits."""
        limit_count, limit_bytes = self.config.cache_sessions, self.config.cache_bytes
        busy = self.running.session.id if self.running is not None else None  # in use: never evicted
        while len(self.cache) > limit_count or sum(e.nbytes for e in self.cache.values()) > limit_bytes:
            victim = next((key for key in self.cache if key != busy), None)
            if victim is None:
                return
            self.forget(victim)
            logger.info("device %s: dropped the cached image and features of session %s", self.name, victim)

    def forget(self, session_id: str) -> None:
        entry = self.cache.pop(session_id, None)
        if entry is not None:
            entry.features.clear()

    # -- the worker --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            with self.service.lock:
                if job.state != "queued":
                    continue  # cancelled while waiting
                self.waiting -= 1
                job.state = "running"
                job.started = time.monotonic()
                self.running = job
                entry = self._entry(job.session.id)
            try:
                self._execute(job, entry)
            except Exception:  # never let the thread die
                logger.error("%s", traceback.format_exc())
                job.finish("error", message="internal error: see the server's log", kind="internal")
            finally:
                with self.service.lock:
                    self.running = None
                    self._trim()
                    job.session.last_used = time.monotonic()
                    self.service.prune_jobs(job.session)

    def _execute(self, job: Job, entry: _CacheEntry) -> None:
        from .outputs import split_suffix, write_result

        timer = None
        if self.config.job_timeout_s:

            def expire() -> None:
                job.timed_out = True
                job.token.cancel()

            timer = threading.Timer(self.config.job_timeout_s, expire)
            timer.daemon = True
            timer.start()
        segmenter = self.segmenter
        try:
            job.token.raise_if_cancelled()
            if entry.volume is None:
                from .io.readers import read_volume

                entry.volume = read_volume(job.session.image)
            options = job.options
            with segmenter.using_features(entry.features):  # this session's features (see _Device.cache)
                result = segmenter.segment(
                    entry.volume,
                    job.prompts,
                    roi=options.get("roi"),
                    probabilities=bool(options.get("probabilities")),
                    largest_component=bool(options.get("largest_component")),
                    fast=bool(options.get("fast")),
                    anatomy_guard=bool(options.get("anatomy_guard", True)),
                    explain=bool(options.get("explain")),
                    progress=job.progress,
                    cancel=job.token,
                )
            job.token.raise_if_cancelled()
            summary = result.summary(None)
            job.folder.mkdir(parents=True, exist_ok=True)
            target = job.folder / f"result{job.format}"
            write_result(result, target, summary, probabilities=bool(options.get("probabilities")))
            stem, _ = split_suffix(target)
            files = [target.name]
            for extra in (job.folder / f"{stem}_probabilities", job.folder / f"{stem}_experts"):
                if extra.is_dir():
                    files += [f"{extra.name}/{p.name}" for p in sorted(extra.iterdir()) if p.is_file()]
            job.summary, job.files = summary, files
            job.finish("done", summary=summary, files=files)
        except Cancelled:
            if job.timed_out:
                job.error, job.error_kind = (
                    (
                        f"the job ran longer than the server's limit of "
                        f"{self.config.job_timeout_s:g} s and was stopped"
                    ),
                    "timeout",
                )
                job.finish("error", message=job.error, kind=job.error_kind)
            else:
                job.finish("cancelled")
        except MoMEError as error:
            job.error, job.error_kind = _one_line(error), _error_kind(error)
            job.finish("error", message=job.error, kind=job.error_kind)
        except Exception as error:
            logger.error("%s", traceback.format_exc())
            job.error = (
                f"{type(error).__name__}: {_one_line(str(error).splitlines()[0] if str(error) else '')}"
            )
            job.error_kind = _error_kind(error)
            job.finish("error", message=job.error, kind=job.error_kind)
        finally:
            if timer is not None:
                timer.cancel()


class SegmentationService:
    """Sessions, jobs and device workers, without HTTP (the FastAPI routes call these methods).

    Args:
        config: limits and settings.
        segmenters: one loaded :class:`~.engine.Segmenter` per device (``None``: load
            ``config.model`` on each of ``config.devices``).
    """

    def __init__(self, config: ServerConfig, segmenters: list | None = None) -> None:
        self.config = config
        self.lock = threading.RLock()
        self._owns_work_dir = config.work_dir is None
        self.work_dir = (
            Path(tempfile.mkdtemp(prefix="mome-serve-"))
            if config.work_dir is None
            else Path(config.work_dir).expanduser().resolve()
        )
        self.sessions_dir = self.work_dir / "sessions"
        if self.sessions_dir.exists():  # a previous run's uploads: they belong to no session any more
            shutil.rmtree(self.sessions_dir, ignore_errors=True)
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.sessions_dir, 0o700)
        if segmenters is None:
            from .engine import Segmenter

            segmenters = [
                Segmenter(config.model, device, threads=config.threads) for device in config.devices
            ]
        self.devices = [_Device(i, s, config, self) for i, s in enumerate(segmenters)]
        self.sessions: dict[str, Session] = {}
        self.jobs: dict[str, Job] = {}
        self.closing = False
        self._stop = threading.Event()
        for device in self.devices:
            device.thread.start()
        self._janitor = threading.Thread(target=self._sweep, name="mome-serve-janitor", daemon=True)
        self._janitor.start()

    # -- information -------------------------------------------------------------------
    def info(self) -> dict:
        segmenter = self.devices[0].segmenter
        return {
            "version": __version__,
            "model": getattr(segmenter, "model_name", None),
            "structures": list(getattr(segmenter, "structures", [])),
            "free_text": bool(getattr(segmenter, "free_text", False)),
            "devices": [d.name for d in self.devices],
            "queued": sum(d.waiting for d in self.devices),
            "sessions": len(self.sessions),
            "limits": self.config.limits(),
        }

    # -- sessions ----------------------------------------------------------------------
    def check_accepting(self) -> None:
        if self.closing:
            raise ServiceError(503, "the server is shutting down")

    def new_session_folder(self) -> tuple[str, Path]:
        """A fresh session id and its (empty, private) folder inside the work folder."""
        self.check_accepting()
        with self.lock:
            if len(self.sessions) >= self.config.max_sessions:
                raise ServiceError(
                    429,
                    f"the server holds its limit of {self.config.max_sessions} images; "
                    "retry later or delete sessions you no longer need",
                    {"Retry-After": "10"},
                )
        session_id = secrets.token_hex(16)
        folder = self.sessions_dir / session_id
        folder.mkdir(mode=0o700)
        return session_id, folder

    def open_session(self, session_id: str, folder: Path, image: Path, sha256: str) -> Session:
        """Read the uploaded image (400 when it is not one, 413 over the voxel limit) and register it."""
        from .io.readers import read_volume

        try:
            try:
                volume = read_volume(image)
            except MoMEError as error:
                message = _one_line(str(error).replace(str(image), "the upload"))
                raise ServiceError(400, f"not a readable image: {message}") from None
            except Exception as error:  # a reader's own exception on a corrupt file
                raise ServiceError(
                    400, f"not a readable image: {type(error).__name__}: {_one_line(error)}"
                ) from None
            voxels = int(volume.array.size)
            if voxels > self.config.max_voxels:
                raise ServiceError(
                    413,
                    f"the image has {voxels} voxels; this server accepts at most {self.config.max_voxels}",
                )
            with self.lock:
                if self.closing:
                    raise ServiceError(503, "the server is shutting down")
                if len(self.sessions) >= self.config.max_sessions:
                    raise ServiceError(
                        429,
                        f"the server holds its limit of {self.config.max_sessions} images",
                        {"Retry-After": "10"},
                    )
                device = min(self.devices, key=lambda d: (d.waiting + (d.running is not None), d.index))
                session = Session(
                    session_id, folder, image, sha256, tuple(int(s) for s in volume.shape), device.index
                )
                self.sessions[session_id] = session
                entry = device._entry(session_id)  # the image is read already: keep it for the first job
                entry.volume = volume
                device._trim()
            return session
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def session(self, session_id: str) -> Session:
        with self.lock:
            session = self.sessions.get(session_id) if _ID.match(session_id or "") else None
            if session is None or session.closed:
                raise ServiceError(
                    404,
                    f"no session {session_id[:40]!r}: it expired, was deleted or never "
                    "existed; upload the image again",
                )
            session.last_used = time.monotonic()
            return session

    def close_session(self, session_id: str) -> None:
        session = self.session(session_id)
        self._remove_session(session)

    def _remove_session(self, session: Session) -> None:
        with self.lock:
            session.closed = True
            self.sessions.pop(session.id, None)
            for job_id in session.jobs:
                job = self.jobs.pop(job_id, None)
                if job is not None and not job.terminal:
                    self._cancel(job)
            device = self.devices[session.device]
            busy = device.running is not None and device.running.session is session
            if not busy:
                device.forget(session.id)
        if not busy:
            shutil.rmtree(session.folder, ignore_errors=True)
        else:  # the running job stops at its next window; its thread removes nothing: do it after
            threading.Thread(target=self._remove_when_idle, args=(session,), daemon=True).start()

    def _remove_when_idle(self, session: Session) -> None:
        device = self.devices[session.device]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with self.lock:
                if device.running is None or device.running.session is not session:
                    device.forget(session.id)
                    break
            time.sleep(0.05)
        shutil.rmtree(session.folder, ignore_errors=True)

    def _sweep(self) -> None:
        interval = max(0.05, min(30.0, self.config.idle_timeout_s / 4))
        while not self._stop.wait(interval):
            now = time.monotonic()
            with self.lock:
                idle = [
                    s
                    for s in self.sessions.values()
                    if now - s.last_used > self.config.idle_timeout_s
                    and not any(not self.jobs[j].terminal for j in s.jobs if j in self.jobs)
                ]
            for session in idle:
                logger.info("session %s idle for %.0f s: deleted", session.id, now - session.last_used)
                self._remove_session(session)

    # -- jobs --------------------------------------------------------------------------
    def submit(self, session_id: str, prompts: str, options: dict, fmt: str) -> Job:
        from .vocabulary import parse_prompts

        self.check_accepting()
        try:
            count = len(parse_prompts(prompts))
        except MoMEError as error:
            raise ServiceError(422, _one_line(error)) from None
        if count > self.config.max_prompts:
            raise ServiceError(
                422, f"{count} prompts in one job; this server accepts at most {self.config.max_prompts}"
            )
        if fmt not in RESULT_FORMATS:
            raise ServiceError(422, f"format must be one of {', '.join(RESULT_FORMATS)}, got {fmt[:20]!r}")
        with self.lock:
            session = self.session(session_id)
            device = self.devices[session.device]
            if device.waiting >= self.config.max_queue:
                raise ServiceError(
                    429,
                    f"the queue of device {device.name} is full ({self.config.max_queue} "
                    "jobs waiting); retry later",
                    {"Retry-After": "2"},
                )
            job = Job(secrets.token_hex(16), session, prompts, options, fmt)
            self.jobs[job.id] = job
            session.jobs.append(job.id)
            device.waiting += 1
            device.queue.put(job)
        return job

    def job(self, job_id: str) -> Job:
        with self.lock:
            job = self.jobs.get(job_id) if _ID.match(job_id or "") else None
        if job is None:
            raise ServiceError(404, f"no job {job_id[:40]!r}: it expired, was deleted or never existed")
        job.session.last_used = time.monotonic()
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.job(job_id)
        with self.lock:
            self._cancel(job)
        return job

    def _cancel(self, job: Job) -> None:
        job.token.cancel()
        if job.state == "queued":
            self.devices[job.session.device].waiting -= 1
            job.finish("cancelled")

    def result_file(self, job_id: str, name: str) -> Path:
        job = self.job(job_id)
        if job.state != "done":
            raise ServiceError(409, f"job {job_id} is {job.state}, it has no result")
        if name not in job.files:
            raise ServiceError(404, f"job {job_id} has no file {name[:80]!r}")
        path = job.folder / name
        if not path.is_file():
            raise ServiceError(404, f"the result of job {job_id} was deleted")
        return path

    def prune_jobs(self, session: Session) -> None:
        """Keep the last ``keep_jobs`` finished jobs of a session (and their files); call with the lock."""
        finished = [j for j in session.jobs if j in self.jobs and self.jobs[j].terminal]
        for job_id in finished[: -self.config.keep_jobs]:
            job = self.jobs.pop(job_id)
            session.jobs.remove(job_id)
            shutil.rmtree(job.folder, ignore_errors=True)

    # -- shutting down -----------------------------------------------------------------
    def close(self) -> None:
        """Cancel every job, stop the workers and delete every upload."""
        with self.lock:
            self.closing = True
            for job in list(self.jobs.values()):
                if not job.terminal:
                    self._cancel(job)
        self._stop.set()
        for device in self.devices:
            device.queue.put(None)
        for device in self.devices:
            device.thread.join(timeout=30)
        with self.lock:
            for session in list(self.sessions.values()):
                session.closed = True
            self.sessions.clear()
            self.jobs.clear()
        shutil.rmtree(self.sessions_dir, ignore_errors=True)
        if self._owns_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# Uploads
# ------------------------------------------------------------------------------------------


class _Upload:
    """Write an upload's bytes (gunzipping them when sent gzip'd) with both size limits."""

    def __init__(self, path: Path, gzipped: bool, wire_limit: int, image_limit: int) -> None:
        self.path = path
        self.handle = open(path, "xb")
        self.digest = hashlib.sha256()
        self.wire = 0
        self.written = 0
        self.wire_limit = wire_limit
        self.image_limit = image_limit
        self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None

    def feed(self, chunk: bytes) -> None:
        self.wire += len(chunk)
        if self.wire > self.wire_limit:
            raise ServiceError(413, f"upload larger than this server's limit of {self.wire_limit} bytes")
        if self.inflate is None:
            self._write(chunk)
            return
        try:
            while chunk:
                # never inflate more than the limit allows at once: a small bomb cannot fill memory
                data = self.inflate.decompress(chunk, max(1, self.image_limit - self.written + 1))
                self._write(data)
                chunk = self.inflate.unconsumed_tail
        except zlib.error as error:
            raise ServiceError(400, f"the upload is not valid gzip data ({error})") from None

    def _write(self, data: bytes) -> None:
        self.written += len(data)
        if self.written > self.image_limit:
            raise ServiceError(
                413,
                f"the image is larger than this server's limit of {self.image_limit} bytes once decompressed",
            )
        self.digest.update(data)
        self.handle.write(data)

    def finish(self) -> str:
        if self.inflate is not None:
            try:
                self._write(self.inflate.flush())
            except zlib.error as error:
                raise ServiceError(400, f"the upload is not valid gzip data ({error})") from None
            if not self.inflate.eof:
                raise ServiceError(400, "the upload's gzip data ends early (truncated upload?)")
        self.handle.close()
        if self.written == 0:
            raise ServiceError(400, "empty upload: send the image file as the request body")
        return self.digest.hexdigest()

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.close()


# ------------------------------------------------------------------------------------------
# The FastAPI application
# ------------------------------------------------------------------------------------------


class _BodyLimit:
    """Pure ASGI middleware: a request body over the route's limit gets 413 before it is read."""

    def __init__(self, app, config: ServerConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        is_upload = scope.get("method") == "POST" and path.rstrip("/") == "/v1/sessions"
        limit = self.config.max_upload_bytes if is_upload else JSON_BODY_LIMIT
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            what = "upload" if is_upload else "request body"
            body = json.dumps({"detail": f"{what} larger than this server's limit of {limit} bytes"}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        return await self.app(scope, receive, send)


def create_app(
    config: ServerConfig, segmenters: list | None = None, service: "SegmentationService | None" = None
):
    """The FastAPI application (``app.state.service`` holds the :class:`SegmentationService`)."""
    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.concurrency import run_in_threadpool

    service = service or SegmentationService(config, segmenters)
    app = FastAPI(
        title="MoMESegmentation server",
        version=__version__,
        description="Text-prompted CT segmentation for clients without a GPU. Research use, "
        "not for diagnosis.",
    )
    app.state.service = service
    app.add_middleware(_BodyLimit, config=config)
    bearer = HTTPBearer(auto_error=False)

    def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if config.api_key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode("utf-8"), config.api_key.encode("utf-8")):
            raise ServiceError(
                401,
                "missing or wrong API key (send 'Authorization: Bearer KEY')",
                {"WWW-Authenticate": "Bearer"},
            )

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError):
        return JSONResponse({"detail": error.message}, status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problems = []
        for item in error.errors()[:3]:
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {item.get('msg', 'invalid')}")
        return JSONResponse(
            {"detail": _one_line("malformed request: " + "; ".join(problems))}, status_code=422
        )

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        roi: list[list[float]] | None = Field(None, description="[[x0, y0, z0], [x1, y1, z1]] in LPS mm")
        probabilities: bool = False
        largest_component: bool = False
        fast: bool = False
        anatomy_guard: bool = True
        explain: bool = False

    class JobRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompts: str | list[str] = Field(..., description="e.g. 'liver, spleen'")
        options: Options = Field(default_factory=Options)
        format: str = Field(".seg.nrrd", description="result file type: " + ", ".join(RESULT_FORMATS))

    @app.get("/health", summary="Liveness (no key needed)")
    def health() -> dict:
        return {"status": "shutting down" if service.closing else "ok", "version": __version__}

    @app.get("/v1/info", dependencies=[Depends(require_key)], summary="Model, devices and limits")
    def info() -> dict:
        return service.info()

    @app.post(
        "/v1/sessions",
        dependencies=[Depends(require_key)],
        status_code=201,
        summary="Upload an image once; prompts then run as jobs on it",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def create_session(
        request: Request, format: str = Query("nrrd", description="nrrd, nii, nii.gz or mha")
    ):
        suffix = UPLOAD_FORMATS.get(format)
        if suffix is None:
            raise ServiceError(
                422, f"format must be one of {', '.join(sorted(UPLOAD_FORMATS))}, got {format[:20]!r}"
            )
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip", ""):
            raise ServiceError(415, f"Content-Encoding {encoding[:20]!r} is not supported; use gzip or none")
        session_id, folder = service.new_session_folder()
        image = folder / f"image{suffix}"
        upload = _Upload(image, encoding == "gzip", config.max_upload_bytes, config.max_image_bytes)
        try:
            async for chunk in request.stream():
                if chunk:
                    upload.feed(chunk)
            sha256 = upload.finish()
            session = await run_in_threadpool(service.open_session, session_id, folder, image, sha256)
        except BaseException:
            upload.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return {
            "session": session.id,
            "sha256": sha256,
            "shape": list(session.shape),
            "device": service.devices[session.device].name,
            "idle_timeout_s": config.idle_timeout_s,
        }

    @app.delete(
        "/v1/sessions/{session_id}",
        dependencies=[Depends(require_key)],
        status_code=204,
        summary="Delete an upload and its results",
    )
    def delete_session(session_id: str):
        service.close_session(session_id)
        return Response(status_code=204)

    @app.post(
        "/v1/sessions/{session_id}/jobs",
        dependencies=[Depends(require_key)],
        status_code=202,
        summary="Segment the session's image for some prompts",
    )
    def create_job(session_id: str, request: JobRequest) -> dict:
        prompts = request.prompts if isinstance(request.prompts, str) else ", ".join(request.prompts)
        options = request.options.model_dump()
        if options["roi"] is not None:
            import numpy as np

            box = np.asarray(options["roi"], dtype=float)
            if box.shape != (2, 3) or not np.all(np.isfinite(box)) or np.any(box[1] <= box[0]):
                raise ServiceError(422, "options.roi must be [[x0, y0, z0], [x1, y1, z1]] with x0 < x1 etc.")
        job = service.submit(session_id, prompts, options, request.format)
        return {"job": job.id, "state": job.state}

    @app.get("/v1/jobs/{job_id}", dependencies=[Depends(require_key)], summary="A job's state and summary")
    def job_status(job_id: str) -> dict:
        return service.job(job_id).status()

    @app.get(
        "/v1/jobs/{job_id}/events",
        dependencies=[Depends(require_key)],
        summary="Events after sequence number 'since', waiting up to 'wait' seconds for one",
    )
    async def job_events(job_id: str, since: int = Query(0, ge=0), wait: float = Query(0.0, ge=0.0)) -> dict:
        # a long poll on the event loop (checked every 50 ms), so that waiting clients hold no threads
        job = service.job(job_id)
        deadline = time.monotonic() + min(wait, MAX_WAIT_S)
        while True:
            events = job.events_since(since, 0.0)
            if events or job.terminal or time.monotonic() >= deadline:
                return {"events": events, "state": job.state}
            await asyncio.sleep(0.05)

    @app.post(
        "/v1/jobs/{job_id}/cancel",
        dependencies=[Depends(require_key)],
        status_code=202,
        summary="Stop a job (at its next window when running)",
    )
    def cancel_job(job_id: str) -> dict:
        return {"job": job_id, "state": service.cancel(job_id).state}

    @app.get(
        "/v1/jobs/{job_id}/files/{name:path}",
        dependencies=[Depends(require_key)],
        summary="A result file of a finished job",
        response_class=FileResponse,
    )
    def job_file(job_id: str, name: str):
        return FileResponse(service.result_file(job_id, name), media_type="application/octet-stream")

    return app


# ------------------------------------------------------------------------------------------
# mome serve
# ------------------------------------------------------------------------------------------


def _key_from(args: argparse.Namespace) -> str | None:
    if getattr(args, "api_key_file", None):
        try:
            return Path(args.api_key_file).expanduser().read_text(encoding="utf-8").strip() or None
        except OSError as error:
            raise InputError(
                f"{args.api_key_file}: cannot read the API key ({error.strerror or error})"
            ) from None
    return os.environ.get("MOME_API_KEY") or None


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this computer without a key (and with a short one)."""
    if is_loopback(host):
        return
    if not api_key:
        raise InputError(
            f"--host {host}: a server reachable from other computers needs an API key; set "
            "MOME_API_KEY or pass --api-key-file (or listen on 127.0.0.1 behind a reverse proxy)"
        )
    if len(api_key) < 16:
        raise InputError(
            "the API key is shorter than 16 characters; make one with: python -c "
            '"import secrets; print(secrets.token_urlsafe(32))"'
        )


def run_server(args: argparse.Namespace) -> int:
    """``mome serve``: load the model on each device and serve until interrupted."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise MoMEError(
            "mome serve needs FastAPI and uvicorn: pip install 'MoMESegmentation[server]'"
        ) from None
    api_key = _key_from(args)
    check_bind(args.host, api_key)
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise InputError("--ssl-keyfile and --ssl-certfile go together")
    devices = tuple(d.strip() for d in str(args.device).split(",") if d.strip())
    config = ServerConfig(
        model=args.model,
        devices=devices or ("auto",),
        threads=args.threads,
        api_key=api_key,
        work_dir=Path(args.work_dir) if args.work_dir else None,
        max_upload_bytes=int(args.max_upload_mb * 1e6),
        max_image_bytes=int(args.max_image_mb * 1e6),
        max_voxels=int(args.max_voxels),
        max_prompts=args.max_prompts,
        max_queue=args.max_queue,
        max_sessions=args.max_sessions,
        cache_sessions=args.cache_sessions,
        cache_bytes=int(args.cache_gb * 1e9),
        idle_timeout_s=args.idle_timeout,
        job_timeout_s=args.job_timeout or None,
    )
    app = create_app(config)
    service: SegmentationService = app.state.service
    scheme = "https" if args.ssl_certfile else "http"
    print(
        f"mome serve: model {service.info()['model']} on {', '.join(d.name for d in service.devices)}; "
        f"{scheme}://{args.host}:{args.port} "
        f"({'API key required' if api_key else 'no API key: this computer only'}); "
        f"docs at /docs",
        flush=True,
    )
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level="warning" if not args.verbose else "info",
            ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile,
            timeout_graceful_shutdown=5,
        )
    finally:
        service.close()
    return 0


def register(sub) -> None:
    """Add ``mome serve`` to the CLI's subcommands."""
    serve = sub.add_parser(
        "serve",
        help="HTTP segmentation server for clients without a GPU (Slicer, mome segment --server)",
        description="Serve segmentation over HTTP. The API key comes from MOME_API_KEY or --api-key-file; "
        "without one the server only listens on this computer. TLS: --ssl-keyfile/--ssl-certfile, or a "
        "reverse proxy in front of 127.0.0.1. Needs the 'server' extra (FastAPI, uvicorn).",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    serve.add_argument("--model", default=None, help="registry name or checkpoint path (default: demo)")
    serve.add_argument(
        "--device",
        default="auto",
        help="device, or several separated by commas (cuda:0,cuda:1): one job at a time on each",
    )
    serve.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    serve.add_argument(
        "--api-key-file", default=None, help="file holding the API key (default: $MOME_API_KEY)"
    )
    serve.add_argument(
        "--work-dir", default=None, help="folder for uploads and results (default: a temp folder)"
    )
    serve.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM)")
    serve.add_argument("--ssl-certfile", default=None, help="TLS certificate chain (PEM)")
    serve.add_argument(
        "--max-upload-mb", type=float, default=1000.0, help="largest upload in MB (default 1000)"
    )
    serve.add_argument(
        "--max-image-mb",
        type=float,
        default=4000.0,
        help="largest image once decompressed, in MB (default 4000)",
    )
    serve.add_argument("--max-voxels", type=float, default=512 * 512 * 1500, help="largest image in voxels")
    serve.add_argument("--max-prompts", type=int, default=32, help="prompts per job (default 32)")
    serve.add_argument("--max-queue", type=int, default=16, help="jobs waiting per device (default 16)")
    serve.add_argument("--max-sessions", type=int, default=64, help="images kept at once (default 64)")
    serve.add_argument(
        "--cache-sessions",
        type=int,
        default=4,
        help="images whose features stay cached per device (default 4)",
    )
    serve.add_argument(
        "--cache-gb", type=float, default=8.0, help="memory for cached features per device (GB)"
    )
    serve.add_argument(
        "--idle-timeout",
        type=float,
        default=1800.0,
        help="seconds after which an unused image is deleted (default 1800)",
    )
    serve.add_argument(
        "--job-timeout", type=float, default=1800.0, help="seconds a job may run (0: no limit)"
    )
    serve.set_defaults(handler=run_server)


def _gzip_bytes(data: bytes) -> bytes:  # used by clients and tests
    return gzip.compress(data, compresslevel=1)
