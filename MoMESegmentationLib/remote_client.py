"""Client side of ``mome serve``: segmentation on a GPU server, driven like the local worker.

:class:`RemoteWorkerClient` has the interface of :class:`~.worker_client.WorkerClient`
(``ensure_started``, ``send``, ``poll_events``, ``wait_event``, ``cancel``, ``stop``, ``kill``), so
:class:`~.slicer_workflow.SegmentationWorkflow` drives it unchanged and sees the same events:
``loaded``, ``progress``, ``done`` (with ``output`` and ``summary``), ``error`` (one-line ``message``
and ``kind``) and ``cancelled``. A ``segment`` request's input file is uploaded once per content
(a new prompt on the same image reuses the server's session and its cached image features); the
result files are downloaded into a staging folder beside the request's output and renamed into
place only when all of them arrived, so a failure (the server killed mid-job, a cancel) leaves the
output folder as it was.

Only the standard library (``urllib``), so it runs in Slicer's Python without extra installs. The
URL and key helpers and :func:`check_connection` (the panel's *Test connection*) are here too.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import queue
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .errors import InputError
from .worker_client import TERMINAL_EVENTS, EventQueue, WorkerError

__all__ = [
    "client_for",
    "connection_report",
    "RemoteWorkerClient",
    "RemoteError",
    "normalize_server_url",
    "check_connection",
    "connection_warning",
    "api_key_from_env",
    "API_KEY_ENV",
]

logger = logging.getLogger(__name__)

#: Environment variable holding the API key (``mome serve`` and ``mome segment --server``).
API_KEY_ENV = "MOME_API_KEY"

#: Upload formats the server reads, by file suffix (see ``server.UPLOAD_FORMATS``).
_UPLOAD_FORMAT = {".nii.gz": "nii.gz", ".nii": "nii", ".nrrd": "nrrd", ".mha": "mha"}


class RemoteError(WorkerError):
    """The server answered with an error, or could not be reached (``status`` is ``None`` then)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(" ".join(str(message).split()))
        self.status = status


def api_key_from_env() -> str | None:
    """The API key from ``MOME_API_KEY``, or ``None``."""
    return (os.environ.get(API_KEY_ENV) or "").strip() or None


def normalize_server_url(text: str) -> str:
    """``"gpu-box:8765"`` -> ``"http://gpu-box:8765"``; refuses anything but an http(s) host address.

    Raises:
        ValueError: one line naming the problem.
    """
    text = (text or "").strip()
    if not text:
        raise ValueError("no server address: enter one like https://gpu-server:8765")
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{text}: the server address must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{text}: the server address has no host name")
    if parts.query or parts.fragment:
        raise ValueError(f"{text}: the server address must not have a query or fragment")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"{text}: the port is not a number between 0 and 65535") from None
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _is_loopback(host: str | None) -> bool:
    host = (host or "").strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connection_warning(url: str, api_key: str | None) -> str | None:
    """A one-line warning when the key would cross the network unencrypted, else ``None``."""
    parts = urllib.parse.urlsplit(normalize_server_url(url))
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        what = "the API key and the images" if api_key else "the images"
        return (
            f"{parts.hostname}: {what} travel unencrypted over http://; use https:// (a TLS server or "
            "a reverse proxy) beyond a trusted network"
        )
    return None


def _detail(data: bytes) -> str:
    try:
        detail = json.loads(data.decode("utf-8")).get("detail")
    except (ValueError, AttributeError, UnicodeDecodeError):
        detail = None
    if isinstance(detail, str) and detail.strip():
        return detail
    text = data.decode("utf-8", "replace").strip()
    return text.splitlines()[0][:200] if text else "no details"


class _Http:
    """Small JSON/bytes HTTP client over urllib with a bearer key."""

    def __init__(self, url: str, api_key: str | None, timeout: float, cafile: str | None) -> None:
        self.url = normalize_server_url(url)
        self.api_key = api_key or None
        self.timeout = float(timeout)
        parts = urllib.parse.urlsplit(self.url)
        handlers: list = []
        if parts.scheme == "https":
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=cafile)))
        if _is_loopback(parts.hostname):
            handlers.append(urllib.request.ProxyHandler({}))  # never send this computer's traffic to a proxy
        self._opener = urllib.request.build_opener(*handlers)

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict | None = None,
        body: bytes | None = None,
        json_body: dict | None = None,
        headers: dict | None = None,
        timeout: float | None = None,
        stream_to=None,
    ) -> tuple[int, dict, bytes]:
        url = self.url + path + (("?" + urllib.parse.urlencode(query)) if query else "")
        headers = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=timeout or self.timeout) as response:
                if stream_to is not None:
                    shutil.copyfileobj(response, stream_to, 1 << 20)
                    return response.status, dict(response.headers), b""
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            data = error.read() if error.fp is not None else b""
            message = _detail(data)
            if error.code == 401:
                message = f"the server at {self.url} refused the API key: {message}"
            else:
                message = f"the server at {self.url} answered {error.code}: {message}"
            raise RemoteError(message, error.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, socket.timeout) or isinstance(error, socket.timeout):
                text = "no answer in time"
            elif isinstance(reason, ConnectionRefusedError):
                text = "connection refused"
            elif isinstance(reason, ssl.SSLError):
                text = f"TLS error ({getattr(reason, 'reason', None) or reason})"
            else:
                text = str(getattr(reason, "strerror", None) or reason or type(error).__name__)
            raise RemoteError(f"cannot reach the segmentation server at {self.url}: {text}") from None

    def json(self, method: str, path: str, **kwargs) -> dict:
        status, _, data = self.request(method, path, **kwargs)
        if not data:
            return {}
        try:
            value = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise RemoteError(
                f"the server at {self.url} answered {status} with something that is not JSON"
            ) from None
        if not isinstance(value, dict):
            raise RemoteError(f"the server at {self.url} answered {status} with unexpected JSON")
        return value


def check_connection(
    url: str, api_key: str | None = None, timeout: float = 10.0, cafile: str | None = None
) -> dict:
    """What the server at ``url`` runs (``GET /v1/info``), checking the key on the way.

    Returns the server's info (``model``, ``structures``, ``devices``, ``version``, ``limits``) plus
    ``message``, a one-line summary for the panel. Raises :class:`RemoteError` with one line.
    """
    http_client = _Http(url, api_key, timeout, cafile)
    info = http_client.json("GET", "/v1/info")
    devices = ", ".join(str(d) for d in info.get("devices") or []) or "unknown device"
    info["message"] = (
        f"connected to {http_client.url}: model {info.get('model')} on {devices} "
        f"(server {info.get('version')}, {len(info.get('structures') or [])} structures)"
    )
    return info


def connection_report(url: str, api_key: str | None = None, timeout: float = 10.0) -> tuple[bool, str]:
    """``(ok, one line)`` for the panel's *Test connection*: what the server runs, or why not."""
    try:
        info = check_connection(url, api_key, timeout)
    except ValueError as error:  # a malformed address
        return False, str(error)
    except RemoteError as error:
        return False, str(error)
    warning = connection_warning(url, api_key)
    return True, info["message"] + (f"; warning: {warning}" if warning else "")


def client_for(server_url: str | None, api_key: str | None, local_client: Callable[[], object],
               log_callback: Callable[[str], None] | None = None):
    """The client a segmentation runs through: a :class:`RemoteWorkerClient` for a server address,
    else ``local_client()`` (a :class:`~.worker_client.WorkerClient` of a local worker process).

    Raises:
        ValueError: the address is malformed (one line).
    """
    if server_url and server_url.strip():
        return RemoteWorkerClient(server_url, api_key, log_callback=log_callback)
    return local_client()


class _RemoteJob:
    def __init__(self, request: dict) -> None:
        self.id = request.get("id")
        self.request = request
        self.remote_id: str | None = None
        self.cancel_requested = threading.Event()
        self.abandoned = threading.Event()  # nothing of this job may reach the output or the events
        self.finished = threading.Event()
        self.thread: threading.Thread | None = None


class RemoteWorkerClient(EventQueue):
    """A :class:`~.worker_client.WorkerClient` look-alike that runs jobs on a ``mome serve`` server.

    Args:
        url: the server, e.g. ``https://gpu-server:8765`` (``host:port`` means ``http://``).
        api_key: the server's key (``None``: ``MOME_API_KEY``, else none).
        log_callback: called with log lines during :meth:`poll_events` / :meth:`wait_event`.
        timeout: seconds an ordinary request may take (uploads and downloads get more).
        poll_wait: seconds one long poll for job events waits on the server.
        cafile: a CA bundle for a server whose TLS certificate is not signed by a public authority.
        retries: how many times a failed connection is retried before the job fails (0.5 s apart).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        log_callback: Callable[[str], None] | None = None,
        timeout: float = 30.0,
        poll_wait: float = 2.0,
        cafile: str | None = None,
        retries: int = 2,
        startup_timeout: float = 60.0,
    ) -> None:
        self._http = _Http(url, api_key if api_key is not None else api_key_from_env(), timeout, cafile)
        self.url = self._http.url
        self.log_callback = log_callback
        self.poll_wait = float(poll_wait)
        self.retries = int(retries)
        self.startup_timeout = float(startup_timeout)
        self.needs_restart = False
        self.loaded: dict | None = None  # the last "loaded" event (the server's model)
        self.version: str | None = None
        self.pid = None  # no local process
        self._running = False
        self._events: queue.Queue = queue.Queue()
        self._logs: queue.Queue = queue.Queue()
        self._pending: collections.deque = collections.deque()
        self._jobs: dict = {}
        self._sessions: dict[str, str] = {}  # sha256 of an uploaded file -> server session id
        self._lock = threading.Lock()
        self._info_lock = threading.Lock()
        self._requested_model: str | None = None
        warning = connection_warning(self.url, self._http.api_key)
        if warning:
            self._logs.put(f"warning: {warning}")

    # ------------------------------------------------------------------ lifecycle

    def is_running(self) -> bool:
        return self._running

    def start(self) -> None:
        self._running = True

    def ensure_started(
        self,
        model: str | None = None,
        device: str = "auto",
        threads: int | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> dict | None:
        """Check the server and its model. ``device`` and ``threads`` are the server's business.

        With ``wait=True`` returns the ``loaded`` event (raising :class:`WorkerError` with one line
        when the server cannot be used); with ``wait=False`` returns ``None`` and the first job asks.
        """
        self._running = True
        self._requested_model = str(model) if model else None
        if self.loaded is not None and not self.needs_restart:
            return self.loaded
        if not wait:
            return None
        return self._load(timeout or self.startup_timeout)

    def _load(self, timeout: float) -> dict:
        with self._info_lock:
            if self.loaded is not None and not self.needs_restart:
                return self.loaded
            info = self._http.json("GET", "/v1/info", timeout=timeout)
            self.version = info.get("version")
            self.loaded = {
                "event": "loaded",
                "model": info.get("model"),
                "device": ", ".join(str(d) for d in info.get("devices") or []),
                "structures": list(info.get("structures") or []),
                "free_text": bool(info.get("free_text")),
                "server": self.url,
            }
            self.needs_restart = False
            wanted = self._requested_model
            if wanted and wanted != self.loaded["model"]:
                self._logs.put(
                    f"the server at {self.url} runs model {self.loaded['model']}; "
                    f"the model chosen here ({wanted}) is not used"
                )
            return self.loaded

    def stop(self, timeout: float = 2.0) -> None:
        """Stop every job (the server is asked to cancel it) and delete this client's uploads there."""
        with self._lock:
            jobs = list(self._jobs.values())
            sessions = list(self._sessions.values())
            self._jobs.clear()
            self._sessions.clear()
        for job in jobs:
            job.abandoned.set()
            job.cancel_requested.set()
            if job.remote_id and not job.finished.is_set():
                try:
                    self._http.request("POST", f"/v1/jobs/{job.remote_id}/cancel", timeout=timeout)
                except RemoteError:
                    pass
        for session in sessions:
            try:
                self._http.request("DELETE", f"/v1/sessions/{session}", timeout=timeout)
            except RemoteError:
                pass
        self._running = False
        self.loaded = None

    def kill(self) -> None:
        """Forget every job at once (nothing more of them is reported or written)."""
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
        for job in jobs:
            job.abandoned.set()
            job.cancel_requested.set()
        self.needs_restart = True
        self.loaded = None

    # ------------------------------------------------------------------ requests and events

    def send(self, request: dict) -> None:
        """Start a ``segment`` request (in a thread of its own); ``cancel`` and ``shutdown`` also work."""
        if not isinstance(request, dict) or "cmd" not in request:
            raise ValueError(f"request must be a dict with a 'cmd' key, got {request!r}")
        command = request["cmd"]
        if command == "cancel":
            self.cancel(str(request.get("id")), timeout=0.0)
            return
        if command == "shutdown":
            self.stop()
            return
        if command == "load":
            self.needs_restart = True
            self.ensure_started(request.get("model"), wait=False)
            threading.Thread(target=self._load_in_background, daemon=True).start()
            return
        if command != "segment":
            self._events.put(
                {
                    "event": "error",
                    "id": request.get("id"),
                    "kind": "input",
                    "message": f"unknown command '{str(command)[:80]}'",
                }
            )
            return
        self._running = True
        job = _RemoteJob(request)
        with self._lock:
            self._jobs[job.id] = job
        job.thread = threading.Thread(
            target=self._run_job, args=(job,), name=f"mome-remote-{job.id}", daemon=True
        )
        job.thread.start()

    def cancel(self, job_id: str, timeout: float = 1.0) -> bool:
        """Cancel job ``job_id``; ``True`` when the server confirmed within ``timeout`` seconds.

        Otherwise the job is abandoned here (nothing more of it is written or reported) and
        ``False`` is returned, as a local worker that had to be killed.
        """
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.finished.is_set():
            return job is not None
        deadline = time.monotonic() + max(0.0, timeout)
        job.cancel_requested.set()
        if job.remote_id:
            try:
                self._http.request("POST", f"/v1/jobs/{job.remote_id}/cancel", timeout=max(0.5, timeout))
            except RemoteError as error:
                self._logs.put(f"cancel: {error}")
        if timeout <= 0:
            return False
        event = self.wait_event(
            lambda e: e.get("event") in TERMINAL_EVENTS and e.get("id") == job_id,
            timeout=max(0.0, deadline - time.monotonic()),
        )
        if event is None:
            job.abandoned.set()
            logger.warning("the server did not confirm cancelling job %s within %.1f s", job_id, timeout)
            return False
        return True

    # ------------------------------------------------------------------ one job

    def _emit(self, job: _RemoteJob, event: str, **fields) -> None:
        if job.abandoned.is_set():
            return
        self._events.put({"event": event, "id": job.id, **fields})

    def _load_in_background(self) -> None:
        try:
            self._events.put(dict(self._load(self.startup_timeout)))
        except RemoteError as error:
            self._events.put({"event": "error", "id": None, "message": str(error), "kind": "internal"})

    def _retrying(self, job: _RemoteJob, call: Callable[[], object]):
        """``call()``, retried on connection failures (not on HTTP errors) ``retries`` times."""
        for attempt in range(self.retries + 1):
            try:
                return call()
            except RemoteError as error:
                if error.status is not None or attempt == self.retries or job.abandoned.is_set():
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")

    def _run_job(self, job: _RemoteJob) -> None:
        request = job.request
        try:
            source = Path(str(request.get("input") or ""))
            output = Path(str(request.get("output") or ""))
            fmt = _result_format(output)
            if not output.parent.is_dir():
                raise InputError(f"{output}: output folder does not exist")
            if self.loaded is None or self.needs_restart:
                self._events.put(dict(self._load(self.startup_timeout)))
            session = self._session(job, source)
            body = {
                "prompts": request.get("prompts", ""),
                "options": _options(request.get("options")),
                "format": fmt,
            }
            job.remote_id = self._create_job(job, session, source, body)
            if job.cancel_requested.is_set():
                self._retrying(job, lambda: self._http.request("POST", f"/v1/jobs/{job.remote_id}/cancel"))
            self._follow(job, output, source)
        except RemoteError as error:
            if job.cancel_requested.is_set() and job.remote_id is None:
                self._emit(job, "cancelled")
            else:
                crashed = error.status is None
                self._emit(
                    job,
                    "error",
                    message=str(error),
                    kind="internal" if crashed or error.status >= 500 or error.status == 404 else "input",
                    **({"crashed": True} if crashed else {}),
                )
        except InputError as error:
            self._emit(job, "error", message=" ".join(str(error).split()), kind="input")
        except Exception as error:  # the client must report anything in one line, never hang a job
            logger.exception("remote job %s failed", job.id)
            self._emit(
                job,
                "error",
                message=f"{type(error).__name__}: {' '.join(str(error).split())[:200]}",
                kind="internal",
            )
        finally:
            job.finished.set()
            with self._lock:
                if self._jobs.get(job.id) is job:
                    del self._jobs[job.id]

    def _session(self, job: _RemoteJob, source: Path) -> str:
        """The server session holding ``source``'s content, uploading it when the server has none."""
        if not source.is_file():
            raise InputError(f"{source}: input not found")
        data = source.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            session = self._sessions.get(digest)
        if session is not None:
            return session
        fmt = next((f for s, f in _UPLOAD_FORMAT.items() if source.name.lower().endswith(s)), None)
        if fmt is None:
            raise InputError(f"{source.name}: the server takes .nrrd, .nii, .nii.gz or .mha files")
        headers = {"Content-Type": "application/octet-stream"}
        if not data.startswith(b"\x1f\x8b"):  # not gzip'd yet (a .nii.gz is sent as it is)
            data = gzip.compress(data, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        self._emit(
            job, "progress", fraction=0.0, stage="upload", message=f"uploading {len(data) / 1e6:.1f} MB"
        )
        answer = self._retrying(
            job,
            lambda: self._http.json(
                "POST",
                "/v1/sessions",
                query={"format": fmt},
                body=data,
                headers=headers,
                timeout=max(self._http.timeout, 120.0 + len(data) / 1e6),
            ),
        )
        session = str(answer.get("session") or "")
        if not session:
            raise RemoteError(f"the server at {self.url} did not open a session for {source.name}")
        with self._lock:
            self._sessions[digest] = session
        return session

    def _create_job(self, job: _RemoteJob, session: str, source: Path, body: dict) -> str:
        deadline = time.monotonic() + 600.0
        uploaded_again = False
        while True:
            if job.cancel_requested.is_set():
                raise RemoteError("cancelled before the job reached the server")
            try:
                answer = self._retrying(
                    job, lambda: self._http.json("POST", f"/v1/sessions/{session}/jobs", json_body=body)
                )
                return str(answer["job"])
            except RemoteError as error:
                if error.status == 404 and not uploaded_again:  # the session expired: upload again
                    with self._lock:
                        self._sessions = {k: v for k, v in self._sessions.items() if v != session}
                    session = self._session(job, source)
                    uploaded_again = True
                    continue
                if error.status == 429 and time.monotonic() < deadline:  # the queue is full: wait
                    self._emit(
                        job, "progress", fraction=0.0, stage="queued", message="the server is busy; waiting"
                    )
                    job.cancel_requested.wait(1.0)
                    continue
                raise

    def _follow(self, job: _RemoteJob, output: Path, source: Path) -> None:
        since = 0
        while True:
            try:
                answer = self._retrying(
                    job,
                    lambda: self._http.json(
                        "GET",
                        f"/v1/jobs/{job.remote_id}/events",
                        query={"since": since, "wait": self.poll_wait},
                        timeout=self._http.timeout + self.poll_wait,
                    ),
                )
            except RemoteError as error:
                if error.status is not None:
                    raise
                reason = str(error).rpartition(": ")[2]
                raise RemoteError(
                    f"the segmentation server at {self.url} stopped answering during the job "
                    f"({reason}); nothing was written"
                ) from None
            for event in answer.get("events") or []:
                since = max(since, int(event.get("seq", since)))
                kind = event.get("event")
                if kind == "progress":
                    self._emit(
                        job,
                        "progress",
                        fraction=event.get("fraction", 0.0),
                        stage=event.get("stage", ""),
                        message=event.get("message", ""),
                    )
                elif kind == "cancelled":
                    self._emit(job, "cancelled")
                    return
                elif kind == "error":
                    self._emit(
                        job,
                        "error",
                        message=str(event.get("message") or "the server reported an error"),
                        kind=str(event.get("kind") or "internal"),
                    )
                    return
                elif kind == "done":
                    summary = dict(event.get("summary") or {})
                    summary["input"] = str(job.request.get("summary_input") or source)  # as a local run says
                    self._download(job, list(event.get("files") or []), summary, output)
                    self._emit(job, "done", output=str(output), summary=summary)
                    return
            if job.abandoned.is_set():
                return

    def _download(self, job: _RemoteJob, files: list[str], summary: dict, output: Path) -> None:
        """Fetch the result files into a staging folder beside ``output``; rename them into place."""
        from .outputs import experts_dir, probabilities_dir, split_suffix, summary_path

        stem, suffix = split_suffix(output)
        names = {
            f"result{suffix}": output.name,
            "result.json": summary_path(output).name,
            "result_probabilities": probabilities_dir(output).name,
            "result_experts": experts_dir(output).name,
        }
        _rename_expert_maps(summary, "result_experts", experts_dir(output).name)
        staging = Path(tempfile.mkdtemp(prefix=".mome-tmp-", dir=output.parent))
        try:
            for name in files:
                head, _, tail = name.partition("/")
                if head not in names or ".." in name.split("/") or (tail and "/" in tail):
                    raise RemoteError(f"the server sent an unexpected result file {name[:80]!r}")
                target = staging / names[head] / tail if tail else staging / names[head]
                target.parent.mkdir(parents=True, exist_ok=True)
                path = f"/v1/jobs/{job.remote_id}/files/{urllib.parse.quote(name)}"

                def fetch(target=target, path=path) -> None:
                    with open(target, "wb") as handle:
                        self._http.request(
                            "GET", path, stream_to=handle, timeout=max(self._http.timeout, 300.0)
                        )

                self._retrying(job, fetch)
            if not (staging / output.name).is_file():
                raise RemoteError(f"the server sent no {suffix} result")
            (staging / summary_path(output).name).write_text(
                json.dumps(summary, indent=2) + "\n", encoding="utf-8"
            )
            if job.abandoned.is_set():
                return
            for item in sorted(staging.iterdir()):
                target = output.parent / item.name
                if target.is_dir() and item.is_dir():
                    shutil.rmtree(target)
                os.replace(item, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # ------------------------------------------------------------------ internals

    def _observe(self, event: dict) -> None:
        if event.get("event") == "loaded":
            self.loaded = event
        if event.get("crashed"):
            self.needs_restart = True

    def _flush_logs(self) -> None:
        while True:
            try:
                line = self._logs.get_nowait()
            except queue.Empty:
                return
            if self.log_callback is not None:
                try:
                    self.log_callback(line)
                except Exception:
                    logger.exception("log callback failed")
            else:
                logger.info("server: %s", line)


def _result_format(output: Path) -> str:
    from .outputs import split_suffix

    return split_suffix(output)[1]  # InputError for an unsupported extension


def _rename_expert_maps(summary: dict, old: str, new: str) -> None:
    """The summary's expert-map paths (``explain.maps``) after their folder is renamed from ``old`` to ``new``."""
    maps = ((summary or {}).get("explain") or {}).get("maps")
    if not isinstance(maps, dict):
        return

    def renamed(path):
        return new + path[len(old):] if isinstance(path, str) and path.startswith(old + "/") else path

    maps["folder"] = new if maps.get("folder") == old else maps.get("folder")
    maps["color_table"] = renamed(maps.get("color_table"))
    for files in (maps.get("structures") or {}).values():
        if isinstance(files, dict):
            for kind in list(files):
                files[kind] = renamed(files[kind])


def _options(options) -> dict:
    """The worker options the server knows (the same names as the local worker's)."""
    options = dict(options or {})
    keys = ("roi", "probabilities", "largest_component", "fast", "anatomy_guard", "explain")
    return {key: options[key] for key in keys if key in options and options[key] is not None}


# ------------------------------------------------------------------------------------------
# mome segment --server
# ------------------------------------------------------------------------------------------


def segment_on_server(
    url: str,
    api_key: str | None,
    inputs: list[Path],
    outputs: list[Path],
    prompts: str,
    options: dict,
    quiet: bool = False,
    timeout: float | None = None,
) -> list[dict]:
    """Segment each input on the server into its output (as ``mome segment`` does locally).

    Inputs the server cannot take as they are (DICOM folders, ``.nhdr``/``.mhd`` with detached data)
    are read here and sent as NRRD. Prints what the local command prints; returns the summaries.
    Raises :class:`~.errors.MoMEError` (one line) when a job fails; outputs written before stay.
    """
    from .cli import _print_table, _ProgressBar
    from .errors import Cancelled, MoMEError, PromptError

    try:
        client = RemoteWorkerClient(url, api_key, log_callback=lambda line: print(line, file=sys.stderr))
    except ValueError as error:
        raise InputError(f"--server: {error}") from None
    summaries = []
    staging = Path(tempfile.mkdtemp(prefix="mome-upload-"))
    try:
        loaded = client.ensure_started(None)
        if not quiet:
            print(f"Server {client.url}: model {loaded.get('model')} on {loaded.get('device')}")
        for n, (path, target) in enumerate(zip(inputs, outputs)):
            source = path
            if not (path.is_file() and any(path.name.lower().endswith(s) for s in _UPLOAD_FORMAT)):
                from .io.readers import read_volume, write_volume

                source = staging / f"input-{n}.nrrd"
                write_volume(read_volume(path), source)
            job_id = f"cli-{n}"
            bar = _ProgressBar(path.name, enabled=not quiet)
            try:
                client.send(
                    {
                        "cmd": "segment",
                        "id": job_id,
                        "input": str(source),
                        "output": str(target),
                        "prompts": prompts,
                        "options": options,
                        "summary_input": str(path),
                    }
                )
                deadline = None if timeout is None else time.monotonic() + timeout
                while True:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        client.cancel(job_id, timeout=5.0)
                        raise MoMEError(f"{path}: the server did not finish within {timeout:g} s")
                    event = client.wait_event(
                        lambda e: e.get("id") == job_id,
                        timeout=0.5 if remaining is None else min(0.5, remaining),
                    )
                    if event is None:
                        continue
                    if event["event"] == "progress":
                        bar(
                            float(event.get("fraction") or 0.0),
                            str(event.get("stage") or ""),
                            str(event.get("message") or ""),
                        )
                    elif event["event"] == "cancelled":
                        raise Cancelled(f"{path}: the job was cancelled on the server")
                    elif event["event"] == "error":
                        error = PromptError if event.get("kind") == "prompt" else MoMEError
                        raise error(str(event.get("message")))
                    elif event["event"] == "done":
                        break
            finally:
                bar.close()
            summary = event.get("summary") or {}
            summaries.append(summary)
            for warning in summary.get("warnings") or []:
                print(f"warning: {warning}", file=sys.stderr)
            print(f"{path} -> {target}")
            if not quiet:
                coverage = summary.get("coverage") or {}
                if coverage.get("description"):
                    print(coverage["description"])
                _print_table([_Row(entry) for entry in summary.get("structures") or []])
        return summaries
    finally:
        client.stop()
        shutil.rmtree(staging, ignore_errors=True)


class _Row:
    """A summary's structure entry with the attributes ``cli._print_table`` reads."""

    def __init__(self, entry: dict) -> None:
        self.label = int(entry.get("label") or 0)
        self.name = str(entry.get("name") or "")
        self.id = entry.get("id")
        self.match = entry.get("match")
        self.found = bool(entry.get("found"))
        self.volume_ml = float(entry.get("volume_ml") or 0.0)
        self.mean_probability = float(entry.get("mean_probability") or 0.0)
        self.uncertain_ml = float(entry.get("uncertain_ml") or 0.0)
        self.note = str(entry.get("note") or "")
        self.rule = str(entry.get("rule") or "")
