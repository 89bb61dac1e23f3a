"""`mome worker` against malformed input: every bad line gets a one-line answer and the worker goes on.

The real worker runs as a subprocess with a tiny random-weight checkpoint. After each malformed
line it must answer exactly one ``error`` event (with the request's ``id`` when one can be read)
and then still segment a volume correctly. Closing stdin mid-job must end the worker quickly
with the job cancelled and no output written. Client-side faults (stray stdout lines, a worker
that never says ``ready``, one that ignores ``shutdown``) are in ``test_worker_client.py``.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine_fixtures import TINY_STRUCTURES, make_ct, make_tiny_checkpoint
from MoMESegmentationLib.io.readers import write_volume
from MoMESegmentationLib.slicer_workflow import read_nrrd_geometry

REPO = Path(__file__).resolve().parents[2]
EVENT_TIMEOUT_S = 30.0  # a worker that stopped answering fails the test after this, never hangs it


class RawWorker:
    """The real worker with byte-level stdin, so that tests can send any line at all."""

    def __init__(self) -> None:
        # Strict UTF-8 as under a UTF-8 locale (a desktop's Slicer): a C locale would hide undecodable bytes.
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8:strict")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "MoMESegmentationLib.cli", "worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
        self.events: queue.Queue = queue.Queue()
        self.stray: list[bytes] = []  # stdout lines that are not JSON objects: there must be none
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.process.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                event = None
            if isinstance(event, dict) and isinstance(event.get("event"), str):
                self.events.put(event)
            else:
                self.stray.append(raw)

    def send_line(self, line: str | bytes) -> None:
        data = line.encode("utf-8") if isinstance(line, str) else line
        self.process.stdin.write(data + b"\n")
        self.process.stdin.flush()

    def send(self, **request) -> None:
        self.send_line(json.dumps(request))

    def next_event(self, timeout: float = EVENT_TIMEOUT_S) -> dict:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the worker answered nothing within {timeout} s "
                                 f"(exit code {self.process.poll()})") from None

    def events_until(self, job_id, kinds=("done", "cancelled", "error")) -> list[dict]:
        """All events up to and including the first of ``kinds`` for ``job_id``."""
        events = []
        while True:
            events.append(self.next_event())
            if events[-1]["event"] in kinds and events[-1].get("id") == job_id:
                return events

    def close(self) -> None:
        try:
            self.send(cmd="shutdown")
            self.process.stdin.close()
            self.process.wait(timeout=10)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("protocol")
    small, big = folder / "small.nrrd", folder / "big.nrrd"
    write_volume(make_ct(), small)
    write_volume(make_ct(shape=(90, 90, 90), spacing=(2.5, 2.5, 2.5)), big)
    return {"checkpoint": make_tiny_checkpoint(folder), "small": small, "big": big}


def start_worker(checkpoint: Path | None) -> RawWorker:
    worker = RawWorker()
    assert worker.next_event()["event"] == "ready"
    if checkpoint is not None:
        worker.send(cmd="load", model=str(checkpoint), device="cpu", threads=1)
        loaded = worker.next_event()
        assert loaded["event"] == "loaded", loaded
        assert loaded["structures"] == TINY_STRUCTURES and loaded["device"] == "cpu"
        assert loaded["free_text"] is False
    return worker


@pytest.fixture(scope="module")
def worker(files):
    process = start_worker(files["checkpoint"])
    yield process
    process.close()


def assert_segments(worker: RawWorker, source: Path, folder: Path, job_id: str) -> None:
    """A valid request right after a malformed one is answered correctly: progress, then a written result."""
    output = folder / f"{job_id}.seg.nrrd"
    worker.send(cmd="segment", id=job_id, input=str(source), prompts="spleen, liver", output=str(output))
    events = worker.events_until(job_id)
    *progress, done = events
    assert done["event"] == "done", done
    assert progress and all(e["event"] == "progress" and e["id"] == job_id for e in progress), events
    assert done["output"] == str(output)
    assert [s["id"] for s in done["summary"]["structures"]] == ["spleen", "liver"]
    assert read_nrrd_geometry(output).shape == read_nrrd_geometry(source).shape
    assert json.loads((folder / f"{job_id}.json").read_text()) == done["summary"]
    assert worker.stray == [], "the worker wrote something that is not a protocol event to stdout"


# (name, line, id the error must carry, words the message must contain, kind)
MALFORMED = [
    ("array", "[1, 2]", None, ["JSON object", "array"], "input"),
    ("string", '"x"', None, ["JSON object", "string"], "input"),
    ("number", "3", None, ["JSON object", "number"], "input"),
    ("null", "null", None, ["JSON object", "null"], "input"),
    ("invalid-json", '{"cmd": "load", ', None, ["not a JSON request"], "input"),
    ("deeply-nested", "[" * 100_000, None, ["not a JSON request"], "input"),
    ("not-utf8", b'\xff\xfe{"cmd": "load"}', None, ["not a JSON request"], "input"),
    ("empty-object", "{}", None, ["'cmd'"], "input"),
    ("no-cmd", '{"id": "no-cmd"}', "no-cmd", ["'cmd'"], "input"),
    ("cmd-not-string", '{"cmd": 7, "id": "n7"}', "n7", ["'cmd'"], "input"),
    ("unknown-cmd", '{"cmd": "frobnicate", "id": "u1"}', "u1", ["unknown command", "frobnicate"], "input"),
    ("segment-no-fields", '{"cmd": "segment", "id": "m1"}', "m1", ["'input'", "'output'", "'prompts'"], "input"),
    ("segment-no-output", '{"cmd": "segment", "id": "m2", "input": "SMALL", "prompts": "liver"}', "m2",
     ["'output'"], "input"),
    ("segment-no-id", '{"cmd": "segment", "input": "SMALL", "prompts": "liver", "output": "OUT"}', None,
     ["'id'"], "input"),
    ("segment-bad-prompts", '{"cmd": "segment", "id": "m3", "input": "SMALL", "prompts": 5, "output": "OUT"}', "m3",
     ["'prompts'"], "input"),
    ("segment-bad-options", '{"cmd": "segment", "id": "m4", "input": "SMALL", "prompts": "liver", '
     '"output": "OUT", "options": [1]}', "m4", ["'options'"], "input"),
    ("load-bad-threads", '{"cmd": "load", "model": "CHECKPOINT", "threads": "many"}', None, ["'threads'"], "input"),
    ("load-missing-checkpoint", '{"cmd": "load", "model": "MISSING"}', None, ["MISSING"], "checkpoint"),
]


@pytest.mark.parametrize("name, line, job_id, words, kind", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_line_gets_one_error_and_worker_keeps_serving(worker, files, tmp_path, name, line, job_id,
                                                                words, kind):
    missing = tmp_path / "missing.safetensors"
    output = tmp_path / "never.seg.nrrd"
    if isinstance(line, str):
        line = (line.replace("SMALL", str(files["small"])).replace("OUT", str(output))
                .replace("CHECKPOINT", str(files["checkpoint"])).replace("MISSING", str(missing)))
        words = [w.replace("MISSING", missing.name) for w in words]
    worker.send_line(line)
    error = worker.next_event()
    assert error["event"] == "error", error
    assert error["id"] == job_id and error["kind"] == kind, error
    assert "\n" not in error["message"] and all(w in error["message"] for w in words), error
    assert not output.exists()
    # the worker still answers, and the model loaded before is still the one in use
    assert_segments(worker, files["small"], tmp_path, f"after-{name}")


def test_cancel_reaches_a_queued_job(worker, files, tmp_path):
    """A job cancelled while it waits behind another one never runs; the running one stops too."""
    worker.send(cmd="segment", id="first", input=str(files["big"]), prompts="liver", output=str(tmp_path / "a.seg.nrrd"))
    worker.send(cmd="segment", id="queued", input=str(files["small"]), prompts="liver",
                output=str(tmp_path / "b.seg.nrrd"))
    worker.send(cmd="cancel", id="queued")
    first = worker.next_event()
    assert (first["event"], first["id"]) == ("progress", "first"), first
    worker.send(cmd="cancel", id="first")
    events = worker.events_until("queued")
    assert [(e["event"], e["id"]) for e in events if e["event"] != "progress"] == [("cancelled", "first"),
                                                                                    ("cancelled", "queued")]
    assert all(e["id"] == "first" for e in events if e["event"] == "progress")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert_segments(worker, files["small"], tmp_path, "after-cancel")


def test_segment_before_load_then_stdin_closed_mid_job(files, tmp_path):
    """Without a model, segment is refused; closing stdin mid-job ends the worker with nothing written."""
    worker = start_worker(None)
    try:
        output = tmp_path / "early.seg.nrrd"
        worker.send(cmd="segment", id="early", input=str(files["small"]), prompts="liver", output=str(output))
        error = worker.next_event()
        assert (error["event"], error["id"], error["kind"]) == ("error", "early", "input"), error
        assert "no model loaded" in error["message"] and not output.exists()

        worker.send(cmd="load", model=str(files["checkpoint"]), device="cpu", threads=1)
        assert worker.next_event()["event"] == "loaded"
        running, queued = tmp_path / "running.seg.nrrd", tmp_path / "queued.seg.nrrd"
        worker.send(cmd="segment", id="running", input=str(files["big"]), prompts="liver, spleen", output=str(running))
        worker.send(cmd="segment", id="queued", input=str(files["small"]), prompts="liver", output=str(queued))
        progress = worker.next_event()
        assert (progress["event"], progress["id"]) == ("progress", "running"), progress
        worker.send_line("[1, 2]")  # a malformed line mid-job: answered at once, and it must not stop the reader
        started = time.monotonic()
        worker.process.stdin.close()
        assert worker.process.wait(timeout=20) == 0
        elapsed = time.monotonic() - started
        worker.reader.join(timeout=10)
        rest = []
        while not worker.events.empty():
            rest.append(worker.events.get())
        assert [(e["event"], e["id"]) for e in rest if e["event"] != "progress"] == [("error", None),
                                                                                  ("cancelled", "running")], rest
        assert "JSON object" in rest[[e["event"] for e in rest].index("error")]["message"]
        assert all(e["id"] == "running" for e in rest if e["event"] == "progress"), "the queued job must not start"
        assert elapsed < 10, f"the worker took {elapsed:.1f} s to stop after stdin closed"
        # nothing written: no result, no summary, no staging folder left behind
        assert sorted(p.name for p in tmp_path.iterdir()) == []
        assert worker.stray == []
    finally:
        worker.close()
