"""Client side of the ``mome worker`` JSON-lines protocol (see ``docs/DESIGN.md``).

The Slicer module runs inference in a separate process (``PythonSlicer -m MoMESegmentationLib.cli
worker``) so that a CUDA error, an out-of-memory kill or a stuck job never takes the application
down. :class:`WorkerClient` owns that process:

* :meth:`WorkerClient.start` launches it with pipes; a reader thread turns each stdout line into an
  event dictionary and queues it; a second thread queues stderr lines as log lines.
* :meth:`WorkerClient.poll_events` never blocks (a ``QTimer`` in Slicer calls it); log lines are
  handed to ``log_callback`` there, on the caller's thread, so GUI code may update widgets.
* :meth:`WorkerClient.cancel` asks the worker to stop a job and kills the process when it does not
  answer within ``timeout`` (1 s); the next :meth:`WorkerClient.ensure_started` starts a fresh one.
* When the process dies unexpectedly, an ``error`` event with ``kind="internal"`` and
  ``"crashed": True`` names the exit code and the last line the worker wrote to stderr.

No Slicer, Qt or third-party imports: the module runs in Slicer's Python and in plain CPython.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

__all__ = ["WorkerClient", "WorkerError", "default_threads", "worker_environment", "CANCEL_TIMEOUT_S"]

logger = logging.getLogger(__name__)

#: How long :meth:`WorkerClient.cancel` waits for the worker to acknowledge before killing it.
CANCEL_TIMEOUT_S = 1.0

#: Events that end a job.
TERMINAL_EVENTS = ("done", "cancelled", "error")


#: Set in the worker's environment unless the caller's environment sets them. With OpenMP's
#: default (active) waiting, torch's threads spin between parallel regions; when other processes
#: keep the cores busy (the application drawing, another job) the spinning steals their time
#: slices. On the 2-core build machine 2 threads then encoded a window 1.1-2.3x slower than with
#: passive waiting, often slower than 1 thread; on an idle machine passive waiting cost nothing
#: measurable (``benchmarks/RESULTS.md``, CPU inference paths).
WORKER_ENVIRONMENT_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def worker_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: ``env`` (``None``: this process's) plus :data:`WORKER_ENVIRONMENT_DEFAULTS`."""
    out = dict(os.environ if env is None else env)
    for name, value in WORKER_ENVIRONMENT_DEFAULTS.items():
        out.setdefault(name, value)
    return out


class WorkerError(RuntimeError):
    """The worker could not be started, died, or answered a request with an error."""


def default_threads(device: str, cpu_count: int | None = None) -> int | None:
    """Thread count for a ``load`` request: bounded on CPU so the application stays responsive.

    Returns ``max(1, cpus - 2)`` for ``"cpu"`` and ``"auto"`` (which may fall back to the CPU) and
    ``None`` (the worker's default) for an explicit CUDA device.
    """
    if str(device).startswith("cuda"):
        return None
    cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(1, int(cpus) - 2)


class EventQueue:
    """Events of a worker, local or remote: :meth:`poll_events` and :meth:`wait_event` over a queue.

    A client puts events on ``self._events`` (from its reader thread); ``self._pending`` holds those a
    wait passed over. It provides ``_observe(event)`` (its own bookkeeping of each event) and
    ``_flush_logs()`` (the worker's log lines to the log callback).
    """

    _events: queue.Queue
    _pending: list

    def poll_events(self) -> list[dict]:
        """Return the events that arrived since the last call (never blocks)."""
        self._flush_logs()
        events = list(self._pending)
        self._pending.clear()
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        for event in events:
            self._observe(event)
        self._flush_logs()
        return events

    def wait_event(self, predicate: Callable[[dict], bool] | None = None,
                   timeout: float | None = None) -> dict | None:
        """Block until an event matching ``predicate`` (any event if ``None``) arrives.

        Events that do not match stay queued for :meth:`poll_events`, in order. Returns ``None``
        after ``timeout`` seconds. A crash of the worker always ends the wait (its ``error`` event
        is returned when it matches, otherwise ``None``).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        skipped: list[dict] = []
        try:
            while True:
                self._flush_logs()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                try:
                    event = self._events.get(timeout=0.05 if remaining is None else min(0.05, remaining))
                except queue.Empty:
                    continue
                self._observe(event)
                if predicate is None or predicate(event):
                    return event
                skipped.append(event)
                if event.get("crashed"):
                    return None
        finally:
            self._pending.extend(skipped)
            self._flush_logs()


class WorkerClient(EventQueue):
    """Start, feed and watch one worker process.

    Args:
        command: the worker's command line, e.g. ``[PythonSlicer, "-m", "MoMESegmentationLib.cli", "worker"]``.
        env: the child's environment (``None``: inherit this process's); either way
            :func:`worker_environment` adds the OpenMP settings it does not set.
        log_callback: called with each stderr line (and each stray non-JSON stdout line) during
            :meth:`poll_events` / :meth:`wait_event`, on the caller's thread.
        cwd: the child's working directory.
        startup_timeout: seconds :meth:`ensure_started` waits for ``ready`` and ``loaded``
            when called with ``wait=True``.
    """

    def __init__(
        self,
        command: Sequence[str],
        env: dict[str, str] | None = None,
        log_callback: Callable[[str], None] | None = None,
        cwd: str | os.PathLike | None = None,
        startup_timeout: float = 600.0,
    ) -> None:
        if not command or not all(isinstance(part, str) and part for part in command):
            raise ValueError(f"command must be a non-empty list of strings, got {command!r}")
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be positive, got {startup_timeout}")
        self.command = list(command)
        self.env = dict(env) if env is not None else None
        self.log_callback = log_callback
        self.cwd = os.fspath(cwd) if cwd is not None else None
        self.startup_timeout = float(startup_timeout)
        self.needs_restart = False  # set when the process was killed or crashed
        self.loaded: dict | None = None  # the last "loaded" event
        self.version: str | None = None  # from the "ready" event
        self._process: subprocess.Popen | None = None
        self._events: queue.Queue = queue.Queue()
        self._logs: queue.Queue = queue.Queue()
        self._pending: collections.deque = collections.deque()  # events read ahead by wait_event
        self._threads: list[threading.Thread] = []
        self._stderr_tail: collections.deque = collections.deque(maxlen=20)
        self._stopping = False
        self._load_key: tuple | None = None
        self._active_job: str | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ process lifecycle

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        """True while the worker process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Launch the worker (a no-op when it already runs)."""
        if self.is_running():
            return
        self._reset_queues()
        # PythonSlicer is a launcher that runs the real interpreter as its child: give the pair a
        # process group of their own so that a kill reaches both.
        if sys.platform == "win32":
            group = {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0)
                     | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
        else:
            group = {"start_new_session": True}
        try:
            self._process = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=worker_environment(self.env), cwd=self.cwd, text=True, encoding="utf-8", errors="replace",
                bufsize=1, **group,
            )
        except OSError as error:
            self._process = None
            raise WorkerError(f"cannot start the worker ({self.command[0]}): {error}") from None
        self._stopping = False
        self.needs_restart = False
        self.loaded = None
        self.version = None
        self._load_key = None
        process = self._process
        self._threads = [
            threading.Thread(target=self._read_stdout, args=(process,), name="mome-client-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, args=(process,), name="mome-client-stderr", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        logger.info("started worker pid %d: %s", process.pid, " ".join(self.command))

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the worker to shut down; kill it if it has not exited within ``timeout`` seconds."""
        process = self._process
        if process is None:
            return
        self._stopping = True
        if process.poll() is None:
            try:
                self._write({"cmd": "shutdown"})
                if process.stdin:
                    process.stdin.close()
            except (OSError, ValueError, WorkerError):
                pass
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        self._join_threads()
        self._close_pipes(process)
        self._process = None
        self.loaded = None
        self._load_key = None
        self._active_job = None

    def kill(self) -> None:
        """Kill the worker now; the next :meth:`ensure_started` starts a fresh one."""
        process = self._process
        if process is None:
            return
        self._stopping = True
        self._kill()
        self._join_threads()
        self._close_pipes(process)
        self._process = None
        self.needs_restart = True
        self.loaded = None
        self._load_key = None
        self._active_job = None

    def ensure_started(self, model: str, device: str = "auto", threads: int | None = None,
                       wait: bool = True, timeout: float | None = None) -> dict | None:
        """Make sure a live worker has ``model`` loaded on ``device``.

        Restarts the process when it died, was killed, or holds another model, device or thread
        count, then sends ``load``. With ``wait=True`` blocks until ``loaded`` and returns that event
        (raising :class:`WorkerError` on an ``error`` event, a crash or after ``timeout``); with
        ``wait=False`` returns ``None`` at once and the ``loaded``/``error`` event arrives through
        :meth:`poll_events` (requests queue up in the worker, so a ``segment`` may follow at once).
        """
        key = (str(model), str(device), threads)
        if self.is_running() and not self.needs_restart and self._load_key == key:
            return self.loaded
        if self._process is not None:
            self.stop()
        self.start()
        self._load_key = key
        self.send({"cmd": "load", "model": str(model), "device": str(device), "threads": threads})
        if not wait:
            return None
        event = self.wait_event(lambda e: e.get("event") == "loaded" or (
            e.get("event") == "error" and e.get("id") is None), timeout=timeout or self.startup_timeout)
        if event is None:
            ready = self.version is not None
            self.kill()
            waited = timeout or self.startup_timeout
            if not ready:
                raise WorkerError(f"the worker did not start: no 'ready' from {self.command[0]} within {waited:g} s")
            raise WorkerError(f"the worker did not load model '{model}' within {waited:g} s")
        if event.get("event") == "error":
            self._load_key = None
            raise WorkerError(event.get("message", "the worker could not load the model"))
        return event

    # ------------------------------------------------------------------ requests and events

    def send(self, request: dict) -> None:
        """Write one request line; raises :class:`WorkerError` when the worker is not running."""
        if not isinstance(request, dict) or "cmd" not in request:
            raise ValueError(f"request must be a dict with a 'cmd' key, got {request!r}")
        if request["cmd"] == "segment":
            self._active_job = request.get("id")
        self._write(request)

    def cancel(self, job_id: str, timeout: float = CANCEL_TIMEOUT_S) -> bool:
        """Cancel job ``job_id``.

        Sends ``cancel`` and waits up to ``timeout`` seconds for the job's ``cancelled`` (or
        ``done``/``error``) event. When none arrives the process is killed and marked for restart.
        Returns ``True`` when the worker stopped the job itself, ``False`` when it had to be killed.
        """
        if not self.is_running():
            self.needs_restart = True
            return False
        try:
            self._write({"cmd": "cancel", "id": job_id})
        except WorkerError:
            self.kill()
            return False
        event = self.wait_event(
            lambda e: e.get("event") in TERMINAL_EVENTS and e.get("id") == job_id, timeout=timeout)
        if event is None:
            logger.warning("worker did not stop job %s within %.1f s: killing pid %s", job_id, timeout, self.pid)
            self.kill()
            return False
        return True

    # ------------------------------------------------------------------ internals

    def _observe(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "ready":
            self.version = event.get("version")
        elif kind == "loaded":
            self.loaded = event
        elif kind == "error" and event.get("id") is None and not event.get("crashed"):
            self._load_key = None  # a failed load must be retried
        if kind in TERMINAL_EVENTS and event.get("id") is not None and event.get("id") == self._active_job:
            self._active_job = None
        if event.get("crashed"):
            self.needs_restart = True

    def _write(self, request: dict) -> None:
        process = self._process
        if process is None or process.poll() is not None or process.stdin is None:
            raise WorkerError("the worker is not running")
        line = json.dumps(request) + "\n"
        with self._lock:
            try:
                process.stdin.write(line)
                process.stdin.flush()
            except (OSError, ValueError) as error:
                raise WorkerError(f"cannot talk to the worker: {error}") from None

    def _read_stdout(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                event = None
            if isinstance(event, dict) and isinstance(event.get("event"), str):
                self._events.put(event)
            else:  # stray output (a library's print, a half line): log it, never treat it as an event
                self._logs.put(line)
        code = process.wait()
        for thread in self._threads:
            if thread.name == "mome-client-stderr" and thread is not threading.current_thread():
                thread.join(timeout=1.0)
        if not self._stopping:
            tail = next((t for t in reversed(self._stderr_tail) if t.strip()), "")
            message = f"the segmentation worker stopped unexpectedly (exit code {code})"
            if tail:
                message += f": {tail.strip()[:300]}"
            self._events.put({"event": "error", "id": self._active_job, "message": message,
                              "kind": "internal", "crashed": True, "returncode": code})

    def _read_stderr(self, process: subprocess.Popen) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            line = line.rstrip("\r\n")
            self._stderr_tail.append(line)
            self._logs.put(line)

    def _flush_logs(self) -> None:
        while True:
            try:
                line = self._logs.get_nowait()
            except queue.Empty:
                return
            if self.log_callback is not None:
                try:
                    self.log_callback(line)
                except Exception:  # a failing log sink must not break event handling
                    logger.exception("log callback failed")
            else:
                logger.info("worker: %s", line)

    def _kill(self) -> None:
        process = self._process
        if process is None:
            return
        kill_tree(process)
        try:
            process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            logger.error("worker pid %d did not exit after kill", process.pid)

    def _join_threads(self) -> None:
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2.0)
        self._threads = []

    @staticmethod
    def _close_pipes(process: subprocess.Popen) -> None:
        for stream in (process.stdin, process.stdout, process.stderr):
            try:
                if stream is not None:
                    stream.close()
            except (OSError, ValueError):
                pass

    def _reset_queues(self) -> None:
        # Drop what an earlier process left behind (its crash event, say) only after delivering logs.
        self._flush_logs()
        self._events = queue.Queue()
        self._pending.clear()
        self._stderr_tail.clear()

    def __del__(self) -> None:  # best effort: never leave an orphan worker behind
        try:
            if self._process is not None:
                kill_tree(self._process)
        except Exception:
            pass


def kill_tree(process: subprocess.Popen) -> None:
    """Kill a child started in its own session and its children (e.g. PythonSlicer's real
    interpreter), even if the launcher is gone."""
    if sys.platform == "win32":
        if process.poll() is None:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if process.poll() is None:
        process.kill()
