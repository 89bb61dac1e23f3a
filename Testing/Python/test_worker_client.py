"""WorkerClient and SegmentationWorkflow against a fake worker process and an in-memory scene.

Runs without Slicer (plain CPython + numpy). Written as unittest cases so that the same file runs
under pytest and inside Slicer (``slicer_add_python_unittest``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from MoMESegmentationLib.errors import MoMEError, PromptError  # noqa: E402
from MoMESegmentationLib.slicer_workflow import (  # noqa: E402
    JobState,
    SegmentationOptions,
    SegmentationWorkflow,
    lps_geometry_from_ijk_to_ras,
    read_nrrd_geometry,
)
from MoMESegmentationLib.worker_client import (  # noqa: E402
    WorkerClient,
    WorkerError,
    default_threads,
    worker_environment,
)

FAKE_WORKER = Path(__file__).resolve().with_name("fake_worker.py")


def fake_command(mode: str = "normal", steps: int = 4, step_time: float = 0.05) -> list[str]:
    python = shutil.which("PythonSlicer") or sys.executable  # inside Slicer, sys.executable is the application
    return [python, str(FAKE_WORKER), "--mode", mode, "--steps", str(steps), "--step-time", str(step_time)]


def write_nrrd(path: Path, array: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    """Write an int16 volume as a raw NRRD in LPS, as Slicer's volume writer does."""
    spacing, origin, direction = lps_geometry_from_ijk_to_ras(ijk_to_ras)
    vectors = " ".join("(" + ",".join(f"{v:.17g}" for v in direction[:, a] * spacing[a]) + ")" for a in range(3))
    header = ["NRRD0004", "type: int16", "dimension: 3", "space: left-posterior-superior",
              "sizes: " + " ".join(str(s) for s in array.shape), f"space directions: {vectors}",
              "kinds: domain domain domain", "endian: little", "encoding: raw",
              "space origin: (" + ",".join(f"{v:.17g}" for v in origin) + ")"]
    data = np.asarray(array, dtype="<i2").tobytes(order="F")
    path.write_bytes(("\n".join(header) + "\n\n").encode("latin-1") + data)


def read_seg_nrrd(path: Path) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, ...]]]:
    """Masks and colours by segment name from a raw single-layer .seg.nrrd."""
    raw = Path(path).read_bytes()
    head, data = raw.split(b"\n\n", 1)
    pairs = dict(line.split(":=", 1) for line in head.decode("latin-1").split("\n") if ":=" in line)
    shape = read_nrrd_geometry(path).shape
    labels = np.frombuffer(data, dtype=np.uint8).reshape(shape, order="F")
    masks, colors, n = {}, {}, 0
    while f"Segment{n}_ID" in pairs:
        name = pairs[f"Segment{n}_Name"]
        masks[name] = labels == int(pairs[f"Segment{n}_LabelValue"])
        colors[name] = tuple(float(c) for c in pairs[f"Segment{n}_Color"].split())
        n += 1
    return masks, colors


class FakeScene:
    """A scene adapter over dictionaries: volumes, segmentations (name -> mask) and studies."""

    def __init__(self) -> None:
        self.volumes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.segmentations: dict[str, dict[str, np.ndarray]] = {}
        self.parents: dict[str, str] = {}  # node -> study (subject hierarchy)
        self.fail_import = False
        self.fail_export = False

    def add_volume(self, ref: str, shape=(12, 10, 8), study: str = "study-1") -> str:
        ijk_to_ras = np.array([[-0.8, 0, 0, 10.0], [0, 0, 1.2, -20.0], [0, -1.5, 0, 30.0], [0, 0, 0, 1]])
        array = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
        self.volumes[ref] = (array, ijk_to_ras)
        self.parents[ref] = study
        return ref

    def snapshot(self) -> tuple:
        return (sorted(self.segmentations), {k: sorted(v) for k, v in self.segmentations.items()},
                {k: {n: m.copy() for n, m in v.items()} for k, v in self.segmentations.items()}, dict(self.parents))

    # SceneAdapter

    def export_volume(self, volume_ref, path):
        if self.fail_export:
            raise OSError(f"{path}: disk full")
        array, ijk_to_ras = self.volumes[volume_ref]
        write_nrrd(Path(path), array, ijk_to_ras)

    def existing_segment_names(self, segmentation_ref):
        return list(self.segmentations.get(segmentation_ref, {})) if segmentation_ref else []

    def import_result(self, seg_path, summary, target_segmentation_ref, replace, reference_volume_ref):
        from MoMESegmentationLib.slicer_workflow import plan_segment_names

        masks, _ = read_seg_nrrd(seg_path)
        if self.fail_import:
            raise RuntimeError("segmentation reader failed")
        target = target_segmentation_ref or f"segmentation-{len(self.segmentations) + 1}"
        segments = dict(self.segmentations.get(target, {}))
        for placement in plan_segment_names(list(masks), list(segments), replace):
            segments[placement.name] = masks[placement.source_name]
        self.segmentations[target] = segments
        self.parents.setdefault(target, self.parents[reference_volume_ref])
        return target


class WorkerClientTest(unittest.TestCase):
    def setUp(self) -> None:
        self.logs: list[str] = []
        self.clients: list[WorkerClient] = []

    def tearDown(self) -> None:
        for client in self.clients:
            client.stop()

    def client(self, startup_timeout: float = 20, **kwargs) -> WorkerClient:
        client = WorkerClient(fake_command(**kwargs), log_callback=self.logs.append, startup_timeout=startup_timeout)
        self.clients.append(client)
        return client

    def test_rejects_bad_arguments(self):
        with self.assertRaises(ValueError):
            WorkerClient([])
        with self.assertRaises(ValueError):
            WorkerClient(["python"], startup_timeout=0)

    def test_default_threads_leave_cores_free(self):
        self.assertEqual(default_threads("cpu", cpu_count=16), 14)
        self.assertEqual(default_threads("auto", cpu_count=2), 1)
        self.assertIsNone(default_threads("cuda:0", cpu_count=16))

    def test_worker_threads_wait_passively_unless_told_otherwise(self):
        self.assertEqual(worker_environment({"A": "1"}), {"A": "1", "OMP_WAIT_POLICY": "PASSIVE"})
        self.assertEqual(worker_environment({"OMP_WAIT_POLICY": "active"})["OMP_WAIT_POLICY"], "active")
        # The process really gets it, also when the client inherits this process's environment.
        script = ("import json, os; print(json.dumps({'event': 'ready', 'version': 'env', "
                  "'omp': os.environ.get('OMP_WAIT_POLICY'), 'path': os.environ.get('PATH')}), flush=True)")
        for env in (None, {"PATH": "/custom"}):
            client = WorkerClient([sys.executable, "-c", script], env=env)
            try:
                client.start()
                event = client.wait_event(lambda e: e.get("event") == "ready", timeout=30)
            finally:
                client.kill()
            self.assertIsNotNone(event)
            self.assertEqual(event["omp"], os.environ.get("OMP_WAIT_POLICY", "PASSIVE") if env is None else "PASSIVE")
            self.assertEqual(event["path"], os.environ.get("PATH") if env is None else "/custom")

    def test_lifecycle_reuse_and_restart(self):
        client = self.client()
        loaded = client.ensure_started("demo", "cpu", threads=2)
        self.assertEqual(loaded["event"], "loaded")
        self.assertEqual(loaded["structures"], ["liver", "spleen", "kidney_left"])
        self.assertEqual(client.version, "fake-1")
        pid = client.pid
        self.assertIs(client.ensure_started("demo", "cpu", threads=2), loaded, "no second load")
        self.assertEqual(client.pid, pid, "same model and device must reuse the process")
        client.ensure_started("demo", "cuda", threads=None)
        self.assertNotEqual(client.pid, pid, "another device must restart the process")
        self.assertTrue(client.is_running())
        self.assertTrue(any("fake worker pid" in line for line in self.logs), "stderr must reach the log callback")
        client.stop()
        self.assertFalse(client.is_running())

    def test_load_error_raises(self):
        client = self.client(mode="load-error")
        with self.assertRaisesRegex(WorkerError, "not installed"):
            client.ensure_started("universal-model", "cpu")

    def test_poll_events_never_blocks(self):
        client = self.client(steps=3, step_time=0.5)
        client.ensure_started("demo", "cpu")
        start = time.monotonic()
        self.assertEqual([e["event"] for e in client.poll_events()], ["ready"], "skipped events stay queued")
        self.assertEqual(client.poll_events(), [])
        self.assertLess(time.monotonic() - start, 0.1)

    def test_stray_stdout_lines_are_logged_not_events(self):
        client = self.client(mode="stray-output", steps=3)
        client.ensure_started("demo", "cpu")
        with tempfile.TemporaryDirectory() as folder:
            source, output = Path(folder) / "ct.nrrd", Path(folder) / "out.seg.nrrd"
            write_nrrd(source, np.zeros((6, 5, 4), np.int16), np.diag([-1.0, -1.0, 1.0, 1.0]))
            client.send({"cmd": "segment", "id": "job", "input": str(source), "prompts": "liver",
                         "output": str(output)})
            done = client.wait_event(lambda e: e.get("id") == "job" and e["event"] in ("done", "error"), timeout=20)
            self.assertIsNotNone(done, "the job's answer must get through the stray lines")
            self.assertEqual(done["event"], "done", done)
            self.assertTrue(output.is_file())
        events = [e["event"] for e in client.poll_events()]
        self.assertEqual(events, ["ready", "progress", "progress", "progress"], "stray lines must not become events")
        self.assertTrue(client.is_running(), "stray output must not end the worker")
        self.assertFalse(client.needs_restart)
        for text in ("stray text before ready", "stray text step 2", "[1, 2]", '{"note": "no event key"}',
                     '{"event": 3}', "not utf-8 step 0", "[" * 5000):
            self.assertIn(text, [line.replace("\ufffd", "").strip() for line in self.logs], text)

    def test_start_timeout_when_worker_never_says_ready(self):
        client = self.client(mode="never-ready", startup_timeout=1.0)
        start = time.monotonic()
        with self.assertRaisesRegex(WorkerError, r"did not start: no 'ready' .* within 1 s"):
            client.ensure_started("demo", "cpu")
        self.assertLess(time.monotonic() - start, 6.0)
        self.assertFalse(client.is_running(), "a worker that never started must be killed")
        self.assertTrue(client.needs_restart)
        self.assertTrue(any("hangs before ready" in line for line in self.logs), self.logs)
        pid = int(next(line for line in self.logs if "hangs before ready" in line).split()[-1])
        with self.assertRaises(ProcessLookupError):
            os.kill(pid, 0)

    def test_stop_kills_a_worker_that_ignores_shutdown(self):
        client = self.client(mode="ignore-stop")
        client.ensure_started("demo", "cpu")
        process = client._process
        stopper = threading.Thread(target=client.stop, kwargs={"timeout": 0.5}, daemon=True)
        start = time.monotonic()
        stopper.start()
        stopper.join(timeout=10.0)
        if stopper.is_alive():  # don't leave the process behind when stop() hangs on its pipes
            process.kill()
        self.assertFalse(stopper.is_alive(), "stop() hung on a worker that ignores shutdown")
        self.assertLess(time.monotonic() - start, 4.0)
        self.assertIsNotNone(process.poll(), "stop() must kill a worker that ignores shutdown")
        self.assertFalse(client.is_running())
        client.poll_events()
        self.assertIn("fake worker ignores shutdown", self.logs, "the shutdown request must have been sent first")

    def test_unstartable_command(self):
        client = WorkerClient(["/nonexistent/PythonSlicer", "-m", "x"])
        with self.assertRaisesRegex(WorkerError, "cannot start"):
            client.start()


class WorkflowTest(unittest.TestCase):
    def setUp(self) -> None:
        self.temp = tempfile.TemporaryDirectory()
        self.root = Path(self.temp.name)
        self.scene = FakeScene()
        self.volume = self.scene.add_volume("volume-1")
        self.progress: list[float] = []
        self.finished: list = []
        self.workflows: list[SegmentationWorkflow] = []

    def tearDown(self) -> None:
        for workflow in self.workflows:
            workflow.shutdown()
        self.temp.cleanup()

    def workflow(self, **kwargs) -> SegmentationWorkflow:
        client = WorkerClient(fake_command(**kwargs), startup_timeout=20)
        workflow = SegmentationWorkflow(client, self.scene, on_progress=lambda job: self.progress.append(job.fraction),
                                        on_finished=self.finished.append, temp_root=self.root / "jobs")
        self.workflows.append(workflow)
        return workflow

    def start_and_wait_for_progress(self, workflow: SegmentationWorkflow):
        """Start a liver job and return it once the worker has reported progress."""
        job = workflow.start(self.volume, "liver")
        deadline = time.monotonic() + 20
        while not self.progress and time.monotonic() < deadline:
            workflow.process_events()
            time.sleep(0.02)
        return job

    def job_folders(self) -> list[Path]:
        folder = self.root / "jobs"
        return sorted(folder.iterdir()) if folder.exists() else []

    def test_segment_imports_result_under_the_study(self):
        workflow = self.workflow()
        job = workflow.start(self.volume, "liver, spleen, left kidney", options=SegmentationOptions(device="cpu"))
        self.assertTrue(job.input_path.is_file(), "the volume must be exported before the worker runs")
        self.assertEqual(self.scene.segmentations, {}, "the scene must not change before the job succeeds")
        workflow.wait(timeout=20)
        self.assertEqual(job.state, JobState.DONE, job.error)
        self.assertEqual(self.finished, [job])
        self.assertEqual(self.progress, sorted(self.progress))
        self.assertEqual(len(self.progress), 4)
        segments = self.scene.segmentations[job.result_ref]
        self.assertEqual(sorted(segments), ["Kidney left", "Liver", "Spleen"])
        for name, mask in segments.items():
            self.assertEqual(mask.shape, (12, 10, 8))
            self.assertGreater(int(mask.sum()), 0, name)
        self.assertEqual(self.scene.parents[job.result_ref], "study-1")
        self.assertEqual([s["id"] for s in job.summary["structures"]], ["liver", "spleen", "kidney_left"])
        self.assertEqual(workflow.structures, ["liver", "spleen", "kidney_left"])
        self.assertEqual(self.job_folders(), [], "temp files must be removed")

    def test_second_job_reuses_worker_and_never_overwrites(self):
        workflow = self.workflow()
        first = workflow.start(self.volume, "liver")
        workflow.wait(timeout=20)
        pid = workflow.client.pid
        second = workflow.start(self.volume, "liver, spleen", segmentation_ref=first.result_ref)
        workflow.wait(timeout=20)
        self.assertEqual(second.state, JobState.DONE, second.error)
        self.assertEqual(workflow.client.pid, pid)
        self.assertEqual(second.result_ref, first.result_ref)
        self.assertEqual(sorted(self.scene.segmentations[first.result_ref]), ["Liver", "Liver (2)", "Spleen"])

    def test_replace_mode_replaces_segment_with_same_name(self):
        workflow = self.workflow()
        self.scene.segmentations["existing"] = {"Liver": np.zeros((12, 10, 8), bool), "Tumor": np.ones((12, 10, 8), bool)}
        job = workflow.start(self.volume, "liver", segmentation_ref="existing",
                             options=SegmentationOptions(replace=True))
        workflow.wait(timeout=20)
        self.assertEqual(job.state, JobState.DONE, job.error)
        segments = self.scene.segmentations["existing"]
        self.assertEqual(sorted(segments), ["Liver", "Tumor"])
        self.assertGreater(int(segments["Liver"].sum()), 0)
        self.assertTrue(segments["Tumor"].all(), "other segments must be kept")

    def test_cancel_is_immediate_and_leaves_scene_unchanged(self):
        workflow = self.workflow(steps=200, step_time=0.05)
        before = self.scene.snapshot()
        job = self.start_and_wait_for_progress(workflow)
        pid = workflow.client.pid
        start = time.monotonic()
        self.assertTrue(workflow.cancel(), "the worker honours cancel")
        self.assertLess(time.monotonic() - start, 1.0)
        self.assertEqual(job.state, JobState.CANCELLED)
        self.assertEqual(self.finished, [job])
        self.assertEqual(self.job_folders(), [])
        time.sleep(0.2)
        workflow.process_events()
        self.assertTrue(_equal_snapshots(self.scene.snapshot(), before))
        self.assertEqual(workflow.client.pid, pid, "a cooperative worker is kept")

    def test_cancel_kills_a_stuck_worker_and_restarts_it(self):
        workflow = self.workflow(mode="ignore-cancel", steps=400, step_time=0.05)
        before = self.scene.snapshot()
        job = self.start_and_wait_for_progress(workflow)
        pid = workflow.client.pid
        start = time.monotonic()
        self.assertFalse(workflow.cancel(), "a stuck worker must be killed")
        self.assertLess(time.monotonic() - start, 1.8)
        self.assertEqual(job.state, JobState.CANCELLED)
        self.assertTrue(workflow.client.needs_restart)
        self.assertFalse(workflow.client.is_running())
        self.assertTrue(_equal_snapshots(self.scene.snapshot(), before))
        self.assertEqual(self.job_folders(), [])
        # the next job starts a fresh process
        workflow.client.command = fake_command(steps=2)
        again = workflow.start(self.volume, "spleen")
        workflow.wait(timeout=20)
        self.assertEqual(again.state, JobState.DONE, again.error)
        self.assertNotEqual(workflow.client.pid, pid)

    def test_crash_reports_clear_error_and_recovers(self):
        workflow = self.workflow(mode="crash", steps=6)
        before = self.scene.snapshot()
        job = workflow.start(self.volume, "liver")
        workflow.wait(timeout=20)
        self.assertEqual(job.state, JobState.FAILED)
        self.assertEqual(job.error_kind, "internal")
        self.assertIn("stopped unexpectedly (exit code 3)", job.error)
        self.assertIn("CUDA out of memory", job.error)
        self.assertTrue(_equal_snapshots(self.scene.snapshot(), before))
        self.assertEqual(self.job_folders(), [])
        self.assertTrue(workflow.client.needs_restart)
        workflow.client.command = fake_command()
        again = workflow.start(self.volume, "liver")
        workflow.wait(timeout=20)
        self.assertEqual(again.state, JobState.DONE, again.error)

    def test_worker_errors_leave_scene_unchanged(self):
        for mode, kind, text in (("prompt-error", "prompt", "no structure matches"),
                                 ("load-error", "checkpoint", "not installed"),
                                 ("bad-grid", "input", "does not match the input volume's grid")):
            with self.subTest(mode=mode):
                workflow = self.workflow(mode=mode)
                before = self.scene.snapshot()
                job = workflow.start(self.volume, "liver")
                workflow.wait(timeout=20)
                self.assertEqual(job.state, JobState.FAILED)
                self.assertEqual(job.error_kind, kind)
                self.assertIn(text, job.error)
                self.assertNotIn("\n", job.error)
                self.assertTrue(_equal_snapshots(self.scene.snapshot(), before))
                self.assertEqual(self.job_folders(), [])

    def test_import_failure_fails_job(self):
        workflow = self.workflow()
        self.scene.fail_import = True
        before = self.scene.snapshot()
        job = workflow.start(self.volume, "liver")
        workflow.wait(timeout=20)
        self.assertEqual(job.state, JobState.FAILED)
        self.assertIn("segmentation reader failed", job.error)
        self.assertTrue(_equal_snapshots(self.scene.snapshot(), before))

    def test_start_checks_and_cleans_up(self):
        workflow = self.workflow()
        with self.assertRaises(PromptError):
            workflow.start(self.volume, " , ")
        self.scene.fail_export = True
        with self.assertRaisesRegex(OSError, "disk full"):
            workflow.start(self.volume, "liver")
        self.assertEqual(self.job_folders(), [])
        self.assertFalse(workflow.client.is_running(), "no worker is started for a failed export")
        self.scene.fail_export = False
        workflow.start(self.volume, "liver")
        with self.assertRaisesRegex(MoMEError, "already running"):
            workflow.start(self.volume, "spleen")
        workflow.wait(timeout=20)

    def test_options_validate(self):
        with self.assertRaisesRegex(ValueError, "device"):
            SegmentationOptions(device="gpu")
        with self.assertRaisesRegex(ValueError, "roi"):
            SegmentationOptions(roi=[[0, 0, 0], [0, 1, 1]])
        with self.assertRaisesRegex(ValueError, "threads"):
            SegmentationOptions(threads=0)
        options = SegmentationOptions(roi=[[0, 0, 0], [1, 1, 1]], fast=True, anatomy_guard=False)
        self.assertEqual(options.worker_options(), {"roi": [[0, 0, 0], [1, 1, 1]], "probabilities": False,
                                                     "largest_component": False, "fast": True,
                                                     "anatomy_guard": False, "explain": False})


def _equal_snapshots(a: tuple, b: tuple) -> bool:
    if a[0] != b[0] or a[1] != b[1] or a[3] != b[3]:
        return False
    return all(np.array_equal(a[2][k][n], b[2][k][n]) for k in a[2] for n in a[2][k])


if __name__ == "__main__":
    unittest.main()
