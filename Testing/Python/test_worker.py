"""`mome worker`: the JSON-lines protocol the Slicer module speaks, run as a real process."""

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


class Worker:
    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "MoMESegmentationLib.cli", "worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.events.put(json.loads(line))

    def send(self, **request) -> None:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()

    def wait(self, *kinds: str, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.5)
            except queue.Empty:
                continue
            if event["event"] in kinds:
                return event
        raise AssertionError(f"no {kinds} event within {timeout} s")

    def close(self) -> None:
        try:
            self.send(cmd="shutdown")
            self.process.wait(timeout=10)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker")
    checkpoint = make_tiny_checkpoint(folder)
    process = Worker()
    process.wait("ready")
    process.send(cmd="load", model=str(checkpoint), device="cpu", threads=1)
    loaded = process.wait("loaded", "error")
    assert loaded["event"] == "loaded", loaded
    assert loaded["structures"] == TINY_STRUCTURES and loaded["device"] == "cpu" and loaded["free_text"] is False
    yield process
    process.close()


def test_segment_progress_and_done(worker, tmp_path):
    source = tmp_path / "ct.nrrd"
    write_volume(make_ct(), source)
    output = tmp_path / "out.seg.nrrd"
    worker.send(cmd="segment", id="job1", input=str(source), prompts="liver, spleen", output=str(output))
    progress = worker.wait("progress")
    assert progress["id"] == "job1" and 0 <= progress["fraction"] <= 1
    done = worker.wait("done", "error")
    assert done["event"] == "done", done
    assert done["id"] == "job1" and done["output"] == str(output)
    assert [s["id"] for s in done["summary"]["structures"]] == ["liver", "spleen"]
    assert read_nrrd_geometry(output).shape == (40, 36, 30), "the result must lie on the input's grid"
    assert json.loads((tmp_path / "out.json").read_text()) == done["summary"]


def test_cancel_reports_cancelled_and_writes_nothing(worker, tmp_path):
    source = tmp_path / "big.nrrd"
    write_volume(make_ct(shape=(90, 90, 90), spacing=(2.5, 2.5, 2.5)), source)
    output = tmp_path / "cancelled.seg.nrrd"
    worker.send(cmd="segment", id="job2", input=str(source), prompts="liver", output=str(output))
    worker.wait("progress")
    started = time.monotonic()
    worker.send(cmd="cancel", id="job2")
    event = worker.wait("cancelled", "done", "error")
    assert event["event"] == "cancelled", event
    assert time.monotonic() - started < 5
    assert not output.exists()


def test_errors_are_one_line_and_worker_survives(worker, tmp_path):
    worker.send(cmd="segment", id="bad", input=str(tmp_path / "missing.nrrd"), prompts="liver",
                output=str(tmp_path / "x.seg.nrrd"))
    error = worker.wait("error")
    assert error["id"] == "bad" and error["kind"] == "input" and "\n" not in error["message"]
    assert "missing.nrrd" in error["message"]
    source = tmp_path / "ct.nrrd"
    write_volume(make_ct(), source)
    worker.send(cmd="segment", id="bad2", input=str(source), prompts=" , ", output=str(tmp_path / "x.seg.nrrd"))
    error = worker.wait("error")
    assert (error["id"], error["kind"]) == ("bad2", "prompt") and "\n" not in error["message"], error
    worker.send(cmd="frobnicate", id="bad3")
    error = worker.wait("error")
    assert (error["id"], error["kind"]) == ("bad3", "input") and "unknown command 'frobnicate'" in error["message"]
    assert not (tmp_path / "x.seg.nrrd").exists()
