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

    def __call__(self, event: str, **fields) -> None:
        line = json.dumps({"event": event, **fields})
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


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


def serve(stdin: IO[str], stdout: IO[str]) -> int:
    """Serve requests from ``stdin`` until ``shutdown`` or end of input; returns the exit status."""
    emit = _Emitter(stdout)
    requests: queue.Queue = queue.Queue()
    current: dict = {"id": None, "token": None}
    lock = threading.Lock()

    def read() -> None:
        for line in stdin:
            line = line.strip()
            if not line:
                continue
            try:
                request = json.loads(line)
            except ValueError:
                emit("error", id=None, message=f"not a JSON request: {line[:80]}", kind="input")
                continue
            if request.get("cmd") == "cancel":
                with lock:
                    if current["token"] is not None and request.get("id") in (None, current["id"]):
                        current["token"].cancel()
                continue
            requests.put(request)
        with lock:  # the client is gone: stop the running job too
            if current["token"] is not None:
                current["token"].cancel()
        requests.put({"cmd": "shutdown"})

    threading.Thread(target=read, name="mome-worker-stdin", daemon=True).start()
    emit("ready", version=__version__)
    segmenter = None
    while True:
        request = requests.get()
        command = request.get("cmd")
        if command == "shutdown":
            return 0
        job_id = request.get("id")
        try:
            if command == "load":
                segmenter = _load(request)
                emit("loaded", model=segmenter.model_name, device=str(segmenter.device),
                     structures=segmenter.structures, free_text=segmenter.free_text)
            elif command == "segment":
                if segmenter is None:
                    raise MoMEError("no model loaded: send a 'load' request first")
                from .engine import CancelToken

                token = CancelToken()
                with lock:
                    current.update(id=job_id, token=token)
                try:
                    summary = _segment(segmenter, request, token,
                                       lambda f, s, m: emit("progress", id=job_id, fraction=round(f, 4),
                                                            stage=s, message=m))
                finally:
                    with lock:
                        current.update(id=None, token=None)
                emit("done", id=job_id, output=request["output"], summary=summary)
            else:
                emit("error", id=job_id, message=f"unknown command '{command}'", kind="input")
        except Cancelled:
            emit("cancelled", id=job_id)
        except MoMEError as error:
            emit("error", id=job_id, message=str(error), kind=_error_kind(error))
        except Exception as error:  # the worker must survive anything and report it in one line
            logger.error("%s", traceback.format_exc())
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            emit("error", id=job_id, message=message, kind=_error_kind(error))


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
        progress=progress, cancel=token)
    token.raise_if_cancelled()
    summary = result.summary(str(source))
    write_result(result, output, summary, probabilities=bool(options.get("probabilities")))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(serve(sys.stdin, sys.stdout))
