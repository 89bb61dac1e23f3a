"""``mome worker``: a long-lived process that the Slicer module drives over JSON lines.

The protocol is written down in ``docs/DESIGN.md``. The model is loaded once; segment requests
reuse it, and the engine's feature cache makes a new prompt on the same volume cheap. A reader
thread keeps listening while a job runs, so a ``cancel`` request stops the job between windows.
Logs go to stderr; stdout carries only protocol events.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import traceback
from pathlib import Path
from typing import IO

from . import __version__
from .errors import Cancelled, CheckpointError, InputError, MoMEError, PromptError

__all__ = ["serve"]

logger = logging.getLogger(__name__)


class _Emitter:
    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.broken = False  # set when stdout is gone: nobody can hear us any more

    def __call__(self, event: str, **fields) -> None:
        line = json.dumps({"event": event, **fields})
        with self._lock:
            if self.broken:
                return
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # a closed pipe: the client is gone
                self.broken = True


def _error_kind(error: BaseException) -> str:
    if isinstance(error, InputError):
        return "input"
    if isinstance(error, PromptError):
        return "prompt"
    if isinstance(error, CheckpointError):
        return "checkpoint"
    if "CUDA" in str(error) or "cuda" in type(error).__name__.lower():
        return "cuda"
    return "input" if isinstance(error, MoMEError) else "internal"


def _request_id(request) -> str | int | None:
    """The request's ``id`` when it is one a reply can carry (a string or an integer), else ``None``."""
    if isinstance(request, dict):
        value = request.get("id")
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return value
    return None


def _parse(line: str) -> dict:
    """One request line as a dictionary with a string ``cmd``; raises :class:`InputError` otherwise."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        raise InputError(f"not a JSON request: {line[:80]}") from None
    if not isinstance(request, dict):
        kind = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
            type(request), "null")
        raise InputError(f"a request must be a JSON object, got {kind}: {line[:80]}")
    command = request.get("cmd")
    if not isinstance(command, str) or not command:
        raise InputError(f"request without a 'cmd' string: {line[:80]}")
    return request


def _check_segment(request: dict) -> None:
    """Refuse a ``segment`` request whose fields are missing or of the wrong type, naming them."""
    problems = [f"'{key}' (a non-empty string)" for key in ("id", "input", "output")
                if not isinstance(request.get(key), str) or not request[key].strip()]
    prompts = request.get("prompts")
    if not (isinstance(prompts, str) or (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts))):
        problems.append("'prompts' (a string or a list of strings)")
    if request.get("options") is not None and not isinstance(request["options"], dict):
        problems.append("'options' (an object or null)")
    if problems:
        raise InputError("segment request needs " + ", ".join(problems))


def _check_load(request: dict) -> None:
    problems = []
    if request.get("model") is not None and not isinstance(request["model"], str):
        problems.append("'model' (a name, a path or null)")
    if request.get("device") is not None and not isinstance(request["device"], str):
        problems.append("'device' (a string)")
    threads = request.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        problems.append("'threads' (a positive integer or null)")
    if problems:
        raise InputError("load request needs " + ", ".join(problems))


def serve(stdin: IO[str], stdout: IO[str]) -> int:
    """Serve requests from ``stdin`` until ``shutdown`` or end of input; returns the exit status.

    Every line gets an answer: a malformed one (not JSON, not an object, no ``cmd``, an unknown
    command, missing fields) an ``error`` event carrying the request's ``id`` when it has one, and
    the worker goes on serving. The end of ``stdin`` (or a failure to read it) always ends the
    worker: the running job is cancelled at its next window, so its output is not written (an
    output is only ever written whole, through a staging folder), and requests still queued are
    dropped.
    """
    emit = _Emitter(stdout)
    requests: queue.Queue = queue.Queue()
    lock = threading.Lock()
    current: dict = {"id": None, "token": None}
    queued: set = set()  # ids of segment requests waiting in the queue
    cancelled: set = set()  # ids of queued segment requests cancelled before they started
    closing = threading.Event()
    if hasattr(stdin, "reconfigure"):  # bytes that are not UTF-8 become a malformed line, not a crash
        try:
            stdin.reconfigure(errors="replace")
        except (ValueError, OSError):
            pass

    def handle(line: str) -> None:
        try:
            request = _parse(line)
        except InputError as error:
            try:
                job_id = _request_id(json.loads(line))
            except (ValueError, RecursionError):
                job_id = None
            emit("error", id=job_id, message=str(error), kind="input")
            return
        job_id = _request_id(request)
        with lock:
            if request["cmd"] == "cancel":
                if current["token"] is not None and request.get("id") in (None, current["id"]):
                    current["token"].cancel()
                elif job_id in queued:
                    cancelled.add(job_id)
                return
            if request["cmd"] == "segment" and job_id is not None:
                queued.add(job_id)
        requests.put(request)

    def read() -> None:
        try:
            for line in stdin:
                line = line.strip()
                if not line:
                    continue
                try:
                    handle(line)
                except Exception as error:  # no line may stop the reader
                    logger.error("%s", traceback.format_exc())
                    emit("error", id=None, message=f"{type(error).__name__}: {_one_line(str(error))[:200]}",
                         kind="internal")
        except Exception:
            logger.error("cannot read requests: %s", traceback.format_exc())
        finally:  # the client is gone: stop the running job too, and then the worker
            with lock:
                closing.set()
                if current["token"] is not None:
                    current["token"].cancel()
            requests.put({"cmd": "shutdown"})

    threading.Thread(target=read, name="mome-worker-stdin", daemon=True).start()
    emit("ready", version=__version__)
    segmenter = None
    while True:
        request = requests.get()
        command = request["cmd"]
        if command == "shutdown" or closing.is_set() or emit.broken:
            return 0
        job_id = _request_id(request)
        try:
            if command == "load":
                _check_load(request)
                segmenter = _load(request)
                emit("loaded", model=segmenter.model_name, device=str(segmenter.device),
                     structures=segmenter.structures, free_text=segmenter.free_text)
            elif command == "segment":
                from .engine import CancelToken

                token = CancelToken()
                with lock:
                    queued.discard(job_id)
                    if job_id in cancelled or closing.is_set():
                        cancelled.discard(job_id)
                        token.cancel()
                    current.update(id=job_id, token=token)
                try:
                    token.raise_if_cancelled()
                    _check_segment(request)
                    if segmenter is None:
                        raise MoMEError("no model loaded: send a 'load' request first")
                    summary = _segment(segmenter, request, token,
                                       lambda f, s, m: emit("progress", id=job_id, fraction=round(f, 4),
                                                            stage=s, message=m))
                finally:
                    with lock:
                        current.update(id=None, token=None)
                emit("done", id=job_id, output=request["output"], summary=summary)
            else:
                emit("error", id=job_id, message=f"unknown command '{command[:80]}'", kind="input")
        except Cancelled:
            emit("cancelled", id=job_id)
        except MoMEError as error:
            emit("error", id=job_id, message=_one_line(str(error), whole=True), kind=_error_kind(error))
        except Exception as error:  # the worker must survive anything and report it in one line
            logger.error("%s", traceback.format_exc())
            emit("error", id=job_id, message=f"{type(error).__name__}: {_one_line(str(error))}",
                 kind=_error_kind(error))


def _one_line(text: str, whole: bool = False) -> str:
    """``text`` on one line: all of it joined (``whole``) or its first line (an unexpected error's)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    return " ".join(lines) if whole else lines[0]


def _load(request: dict):
    import torch

    from .engine import Segmenter

    threads = request.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    return Segmenter(request.get("model"), request.get("device", "auto"), threads=threads)


def _segment(segmenter, request: dict, token, progress) -> dict:
    from .io.readers import read_volume
    from .outputs import write_result

    options = request.get("options") or {}
    source = Path(request["input"])
    output = Path(request["output"])
    if not output.parent.is_dir():
        raise InputError(f"{output}: output folder does not exist")
    volume = read_volume(source)
    result = segmenter.segment(
        volume, request.get("prompts", ""), roi=options.get("roi"),
        probabilities=bool(options.get("probabilities")), largest_component=bool(options.get("largest_component")),
        fast=bool(options.get("fast")), anatomy_guard=bool(options.get("anatomy_guard", True)),
        explain=bool(options.get("explain")), progress=progress, cancel=token)
    token.raise_if_cancelled()
    summary = result.summary(str(source))
    write_result(result, output, summary, probabilities=bool(options.get("probabilities")))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(serve(sys.stdin, sys.stdout))
