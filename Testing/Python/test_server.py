"""`mome serve` and its client on this computer's loopback: sessions, jobs, limits, failures.

A tiny model serves every test, its network replaced by one with known answers (``IntensityNetwork``
of Testing/Python/engine_fixtures.py: the real engine around it); a job on the small test CT takes a
fraction of a second. Tests that need a job to last slow the model's image encoder
down (``slow``) instead of using large images.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from engine_fixtures import IntensityNetwork, make_ct, make_tiny_checkpoint, never, step  # noqa: E402
from MoMESegmentationLib.cli import main  # noqa: E402
from MoMESegmentationLib.engine import Segmenter  # noqa: E402
from MoMESegmentationLib.io.readers import read_volume, write_volume  # noqa: E402
from MoMESegmentationLib.io.segmentation import read_segmentation  # noqa: E402
from MoMESegmentationLib.outputs import write_result  # noqa: E402
from MoMESegmentationLib.remote_client import (  # noqa: E402
    RemoteError,
    RemoteWorkerClient,
    check_connection,
    connection_warning,
    normalize_server_url,
)
from MoMESegmentationLib.server import ServerConfig, SegmentationService, check_bind, create_app  # noqa: E402
from MoMESegmentationLib.slicer_workflow import JobState, SegmentationOptions, SegmentationWorkflow  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
KEY = "test-key-0123456789abcdef"


def start_uvicorn(app):
    """Serve ``app`` on a free loopback port in a thread; returns ``(server, thread, url)``."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


class Slow:
    """Make the model's image encoder take ``delay`` seconds more per call (0: as it is)."""

    def __init__(self, segmenter) -> None:
        self.delay = 0.0
        original = segmenter.model.encode

        def encode(*args, **kwargs):
            if self.delay:
                time.sleep(self.delay)
            return original(*args, **kwargs)

        segmenter.model.encode = encode


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    checkpoint = make_tiny_checkpoint(folder)
    segmenter = Segmenter(str(checkpoint), "cpu")
    # random weights find nothing: a network with known answers makes "equal to a local run" mean something
    segmenter.model = IntensityNetwork(
        segmenter,
        {
            "liver": step(70.0),
            "spleen": step(0.0),
            "kidney_left": step(95.0),
            "kidney_right": never,
            None: never,
        },
    )
    slow = Slow(segmenter)
    config = ServerConfig(api_key=KEY, work_dir=folder / "work", max_queue=16, cache_sessions=4)
    app = create_app(config, [segmenter])
    server, thread, url = start_uvicorn(app)
    yield {
        "url": url,
        "config": config,
        "service": app.state.service,
        "checkpoint": checkpoint,
        "slow": slow,
        "segmenter": segmenter,
        "folder": folder,
    }
    server.should_exit = True
    thread.join(timeout=10)
    app.state.service.close()


@pytest.fixture()
def limits(served):
    """Change the server's limits for one test; they are restored afterwards."""
    config = served["config"]
    saved = dict(vars(config))
    yield config
    vars(config).update(saved)
    served["slow"].delay = 0.0


def request(url, method="GET", body=None, headers=None, key=KEY):
    """``(status, json or bytes)`` of one raw HTTP request."""
    headers = dict(headers or {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=body, method=method, headers=headers), timeout=30
        ) as answer:
            status, data = answer.status, answer.read()
    except urllib.error.HTTPError as error:
        status, data = error.code, error.read()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data


def upload(url, path: Path, fmt="nrrd", key=KEY):
    return request(
        f"{url}/v1/sessions?format={fmt}",
        "POST",
        gzip.compress(path.read_bytes()),
        {"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"},
        key=key,
    )


def ct_file(folder: Path, name="ct.nrrd", **kwargs) -> Path:
    path = folder / name
    write_volume(make_ct(**kwargs), path)
    return path


def masks(path: Path) -> dict[str, np.ndarray]:
    return {s.name: np.asarray(s.mask) for s in read_segmentation(path).segments}


def local_masks(segmenter, source: Path, prompts: str, folder: Path) -> dict[str, np.ndarray]:
    """What a local run writes for ``prompts`` on ``source``, as masks by segment name."""
    result = segmenter.segment(read_volume(source), prompts)
    target = folder / f"local-{abs(hash((str(source), prompts)))}.seg.nrrd"
    write_result(result, target, result.summary(str(source)))
    return masks(target)


def run_job(client, job_id, source, output, prompts, options=None, timeout=60.0) -> dict:
    client.send(
        {
            "cmd": "segment",
            "id": job_id,
            "input": str(source),
            "output": str(output),
            "prompts": prompts,
            "options": options or {},
        }
    )
    event = client.wait_event(
        lambda e: e.get("id") == job_id and e["event"] in ("done", "error", "cancelled"), timeout=timeout
    )
    assert event is not None, f"job {job_id} did not finish within {timeout} s"
    return event


def session_folders(served) -> list[Path]:
    return sorted(p for p in served["service"].sessions_dir.iterdir())


# ---------------------------------------------------------------------------------------------------- basics


def test_upload_segment_and_a_new_prompt_reuses_the_image_features(served, tmp_path):
    """Two prompts on one image: one upload, the second encodes no window; results equal a local run."""
    source = ct_file(tmp_path)
    client = RemoteWorkerClient(served["url"], KEY)
    try:
        loaded = client.ensure_started("demo")
        assert loaded["structures"] == ["liver", "spleen", "kidney_left", "kidney_right"]
        sessions_before = len(served["service"].sessions)
        first = run_job(client, "a", source, tmp_path / "first.seg.nrrd", "liver, spleen")
        assert first["event"] == "done", first
        assert first["summary"]["feature_windows"]["encoded"] > 0
        other = run_job(
            client, "o", ct_file(tmp_path, "other.nrrd", seed=1), tmp_path / "other.seg.nrrd", "liver"
        )
        assert other["event"] == "done" and other["summary"]["feature_windows"]["reused"] == 0, other
        # back to the first image after another one: its features are still cached (per session)
        second = run_job(client, "b", source, tmp_path / "second.seg.nrrd", "left kidney")
        assert second["event"] == "done", second
        assert second["summary"]["feature_windows"] == {
            "encoded": 0,
            "reused": first["summary"]["feature_windows"]["encoded"],
        }
        assert len(served["service"].sessions) == sessions_before + 2, "each image must be uploaded once"
        assert first["output"] == str(tmp_path / "first.seg.nrrd")
        assert json.loads((tmp_path / "first.json").read_text()) == first["summary"]
        assert first["summary"]["input"] == str(source)
        for name, prompts in (("first", "liver, spleen"), ("second", "left kidney")):
            remote = masks(tmp_path / f"{name}.seg.nrrd")
            local = local_masks(served["segmenter"], source, prompts, tmp_path)
            assert sorted(remote) == sorted(local) and len(local) == len(prompts.split(","))
            assert all(mask.any() for mask in local.values())
            for segment in local:
                assert np.array_equal(remote[segment], local[segment]), (
                    f"{name}: {segment} differs from a local run"
                )
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".mome-tmp-")]
        assert leftovers == []
    finally:
        client.stop()


def test_health_docs_and_keys(served):
    url = served["url"]
    assert request(f"{url}/health", key=None) == (
        200,
        {"status": "ok", "version": served["service"].info()["version"]},
    )
    status, spec = request(f"{url}/openapi.json", key=None)
    assert status == 200 and "/v1/sessions/{session_id}/jobs" in spec["paths"]
    for key in (None, "wrong-key"):
        status, answer = request(f"{url}/v1/info", key=key)
        assert status == 401 and "API key" in answer["detail"], answer
    with pytest.raises(RemoteError) as caught:
        check_connection(url, "wrong-key")
    assert (
        caught.value.status == 401
        and "refused the API key" in str(caught.value)
        and "\n" not in str(caught.value)
    )
    info = check_connection(url, KEY)
    assert info["devices"] == ["cpu"] and "connected to" in info["message"]
    with pytest.raises(RemoteError) as caught:
        check_connection("http://127.0.0.1:9", KEY, timeout=5)  # nothing listens on the discard port
    assert caught.value.status is None and "cannot reach" in str(caught.value)


def test_refuses_to_listen_beyond_loopback_without_a_key(capsys):
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    for host in ("0.0.0.0", "192.168.1.20", "gpu-box"):
        with pytest.raises(Exception, match="needs an API key"):
            check_bind(host, None)
    with pytest.raises(Exception, match="shorter than 16"):
        check_bind("0.0.0.0", "short")
    check_bind("0.0.0.0", KEY)
    env = dict(os.environ)
    os.environ.pop("MOME_API_KEY", None)
    try:
        assert main(["serve", "--host", "0.0.0.0", "--model", "nothing-is-loaded"]) == 2
    finally:
        os.environ.clear()
        os.environ.update(env)
    err = capsys.readouterr().err.strip()
    assert err.startswith("mome: error:") and "needs an API key" in err and "\n" not in err


def test_url_helpers():
    assert normalize_server_url(" gpu-box:8765/ ") == "http://gpu-box:8765"
    assert normalize_server_url("https://gpu-box/mome/") == "https://gpu-box/mome"
    for bad in ("", "ftp://gpu-box", "http://", "http://gpu-box:99999", "http://gpu-box/?a=1"):
        with pytest.raises(ValueError):
            normalize_server_url(bad)
    assert connection_warning("http://127.0.0.1:8765", KEY) is None
    assert connection_warning("https://gpu-box:8765", KEY) is None
    assert "unencrypted" in connection_warning("http://gpu-box:8765", KEY)


# ---------------------------------------------------------------------------------------------------- limits


def test_upload_limits_and_malformed_uploads_leave_nothing(served, limits, tmp_path):
    url = served["url"]
    source = ct_file(tmp_path)
    before = session_folders(served)
    limits.max_upload_bytes = 1000
    status, answer = upload(url, source)
    assert status == 413 and "limit of 1000 bytes" in answer["detail"], answer
    # chunked (no Content-Length): the limit holds while the body streams in
    chunks = iter([gzip.compress(source.read_bytes())])
    status, answer = request(
        f"{url}/v1/sessions?format=nrrd",
        "POST",
        chunks,
        {"Content-Encoding": "gzip", "Transfer-Encoding": "chunked"},
    )
    assert status == 413, answer
    limits.max_upload_bytes = 1 << 30
    limits.max_image_bytes = 100_000  # a small gzip that inflates beyond the limit
    status, answer = request(
        f"{url}/v1/sessions?format=nrrd",
        "POST",
        gzip.compress(b"\0" * 10_000_000),
        {"Content-Encoding": "gzip"},
    )
    assert status == 413 and "once decompressed" in answer["detail"], answer
    limits.max_image_bytes = 4 << 30
    limits.max_voxels = 1000
    status, answer = upload(url, source)
    assert status == 413 and "voxels" in answer["detail"], answer
    limits.max_voxels = 10**9
    for body, headers, expected in (
        (b"this is not an image", {}, "not a readable image"),
        (b"not gzip at all", {"Content-Encoding": "gzip"}, "not valid gzip"),
        (gzip.compress(source.read_bytes())[:-50], {"Content-Encoding": "gzip"}, ""),
        (b"", {}, "empty upload"),
    ):
        status, answer = request(f"{url}/v1/sessions?format=nrrd", "POST", body, headers)
        assert status == 400 and expected in answer["detail"] and "\n" not in answer["detail"], answer
        assert str(served["service"].work_dir) not in answer["detail"], "server paths must not leak"
    status, answer = upload(url, source, fmt="dcm")
    assert status == 422 and "format must be one of" in answer["detail"]
    status, answer = request(f"{url}/v1/sessions?format=nrrd", "POST", b"x", {"Content-Encoding": "br"})
    assert status == 415
    assert session_folders(served) == before, "a refused upload must leave nothing behind"


def test_job_requests_are_checked(served, limits, tmp_path):
    url = served["url"]
    status, answer = upload(url, ct_file(tmp_path))
    assert status == 201, answer
    jobs = f"{url}/v1/sessions/{answer['session']}/jobs"
    limits.max_prompts = 2
    status, answer2 = request(jobs, "POST", {"prompts": "liver, spleen, left kidney"})
    assert status == 422 and "at most 2" in answer2["detail"], answer2
    for body in (
        {"prompts": 3},
        {"prompts": "liver", "options": {"pickle": True}},
        {"prompts": "liver", "options": {"roi": [[0, 0, 0], [-1, 1, 1]]}},
        {"prompts": " , "},
        {"prompts": "liver", "format": ".exe"},
    ):
        status, answer2 = request(jobs, "POST", body)
        assert status == 422 and "\n" not in answer2["detail"], (body, answer2)
    status, answer2 = request(jobs, "POST", b"{not json", {"Content-Type": "application/json"})
    assert status == 422, answer2
    status, answer2 = request(
        jobs, "POST", b"{" + b" " * 300_000 + b"}", {"Content-Type": "application/json"}
    )
    assert status == 413, answer2
    assert request(f"{url}/v1/sessions/{'0' * 32}/jobs", "POST", {"prompts": "liver"})[0] == 404
    assert request(f"{url}/v1/sessions/..%2F..%2Fetc/jobs", "POST", {"prompts": "liver"})[0] == 404
    assert request(f"{url}/v1/jobs/{'0' * 32}/files/..%2F..%2Fimage.nrrd")[0] == 404
    status, _ = request(f"{url}/v1/sessions/{answer['session']}", "DELETE")
    assert status == 204
    assert not (served["service"].sessions_dir / answer["session"]).exists(), "the upload must be deleted"
    assert request(jobs, "POST", {"prompts": "liver"})[0] == 404


def test_a_full_queue_answers_429(served, limits, tmp_path):
    url = served["url"]
    limits.max_queue = 1
    served["slow"].delay = 0.5
    status, answer = upload(url, ct_file(tmp_path, seed=7))
    assert status == 201
    jobs = f"{url}/v1/sessions/{answer['session']}/jobs"
    statuses = [request(jobs, "POST", {"prompts": "liver"}) for _ in range(3)]
    codes = [s for s, _ in statuses]
    assert codes[0] == 202 and 429 in codes, codes
    refused = next(a for s, a in statuses if s == 429)
    assert "queue" in refused["detail"] and "full" in refused["detail"]
    for status, job in statuses:
        if status == 202:
            request(f"{url}/v1/jobs/{job['job']}/cancel", "POST")
    served["slow"].delay = 0.0
    for status, job in statuses:
        if status == 202:
            deadline = time.monotonic() + 30
            while request(f"{url}/v1/jobs/{job['job']}")[1]["state"] in ("queued", "running"):
                assert time.monotonic() < deadline
                time.sleep(0.05)


# --------------------------------------------------------------------------------------- cancel and timeouts


class Scene:
    """A scene adapter over dictionaries (the Slicer module's is tested in test_slicer_scene.py)."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.segmentations: dict[str, dict[str, np.ndarray]] = {}

    def export_volume(self, volume_ref, path):
        Path(path).write_bytes(self.source.read_bytes())

    def existing_segment_names(self, segmentation_ref):
        return list(self.segmentations.get(segmentation_ref, {}))

    def import_result(self, seg_path, summary, target, replace, reference_volume_ref):
        target = target or f"segmentation-{len(self.segmentations) + 1}"
        self.segmentations.setdefault(target, {}).update(masks(seg_path))
        return target


def test_the_workflow_drives_the_remote_client_cancel_and_all(served, limits, tmp_path):
    """SegmentationWorkflow runs unchanged on RemoteWorkerClient: done, then a cancel that leaves no trace."""
    scene = Scene(ct_file(tmp_path, seed=3))
    progress = []
    workflow = SegmentationWorkflow(
        RemoteWorkerClient(served["url"], KEY),
        scene,
        on_progress=lambda job: progress.append(job.fraction),
        temp_root=tmp_path / "jobs",
    )
    try:
        job = workflow.start("volume", "liver, spleen", options=SegmentationOptions(device="cpu"))
        workflow.wait(timeout=60)
        assert job.state == JobState.DONE, job.error
        assert progress and progress == sorted(progress)
        assert sorted(scene.segmentations[job.result_ref]) == sorted(
            s["name"] for s in job.summary["structures"] if s["found"]
        )
        assert workflow.structures == ["liver", "spleen", "kidney_left", "kidney_right"]
        before = {k: dict(v) for k, v in scene.segmentations.items()}
        served["slow"].delay = 0.4
        # a new, larger image: several windows, each encoded
        scene.source = ct_file(
            tmp_path, name="other.nrrd", seed=4, shape=(90, 90, 90), spacing=(2.5, 2.5, 2.5)
        )
        job = workflow.start("volume", "kidney_right")
        deadline = time.monotonic() + 30
        while job.stage != "inference" and time.monotonic() < deadline:
            workflow.process_events()
            time.sleep(0.02)
        assert job.stage == "inference" and not job.is_finished, (job.stage, job.state)
        started = time.monotonic()
        assert workflow.cancel() is True, "the server stops a job at its next window"
        assert time.monotonic() - started < 1.0
        assert job.state == JobState.CANCELLED
        assert list((tmp_path / "jobs").iterdir()) == []
        assert scene.segmentations.keys() == before.keys()
    finally:
        workflow.shutdown()


def test_a_job_over_the_time_limit_fails_with_one_line(served, limits, tmp_path):
    limits.job_timeout_s = 0.3
    served["slow"].delay = 0.5
    client = RemoteWorkerClient(served["url"], KEY)
    try:
        event = run_job(client, "slow", ct_file(tmp_path, seed=5), tmp_path / "slow.seg.nrrd", "liver")
    finally:
        client.stop()
    assert event["event"] == "error" and event["kind"] == "timeout", event
    assert "limit of 0.3 s" in event["message"] and "\n" not in event["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd"]


def test_idle_sessions_are_deleted(served, tmp_path):
    config = ServerConfig(work_dir=tmp_path / "work", idle_timeout_s=0.3)
    service = SegmentationService(config, [served["segmenter"]])
    try:
        source = ct_file(tmp_path)
        session_id, folder = service.new_session_folder()
        image = folder / "image.nrrd"
        image.write_bytes(source.read_bytes())
        service.open_session(session_id, folder, image, "0" * 64)
        assert folder.is_dir() and session_id in service.sessions
        deadline = time.monotonic() + 10
        while session_id in service.sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert session_id not in service.sessions and not folder.exists()
        assert not service.devices[0].cache, "an expired session's features must be dropped"
    finally:
        service.close()
    assert not (tmp_path / "work" / "sessions").exists()


# ---------------------------------------------------------------------------------------------- many clients


def test_eight_clients_three_jobs_each_all_correct(served, tmp_path):
    """8 clients x 3 jobs on 8 images (more than the feature cache holds): every result is a local run's."""
    prompts = ["liver", "spleen, left kidney", "right kidney"]
    images = [ct_file(tmp_path, name=f"ct{n}.nrrd", seed=10 + n) for n in range(4)]
    sources = [images[n % 4] for n in range(8)]  # two clients per image, each with its own upload
    results: dict[tuple[int, int], dict] = {}
    errors: list[str] = []

    def client_run(n: int) -> None:
        client = RemoteWorkerClient(served["url"], KEY)
        try:
            for k, prompt in enumerate(prompts):
                out = tmp_path / f"out-{n}-{k}.seg.nrrd"
                results[(n, k)] = run_job(client, f"c{n}-{k}", sources[n], out, prompt, timeout=120)
        except Exception as error:  # reported below
            errors.append(f"client {n}: {error}")
        finally:
            client.stop()

    threads = [threading.Thread(target=client_run, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert len(results) == 24 and all(e["event"] == "done" for e in results.values()), [
        e for e in results.values() if e["event"] != "done"
    ]
    device = served["service"].devices[0]
    assert len(device.cache) <= served["config"].cache_sessions
    expected = {
        (m, k): local_masks(served["segmenter"], images[m], prompts[k], tmp_path)
        for m in range(4)
        for k in range(3)
    }
    for (n, k), event in results.items():
        remote = masks(Path(event["output"]))
        local = expected[(n % 4, k)]
        assert sorted(remote) == sorted(local), (n, k)
        for name in local:
            assert np.array_equal(remote[name], local[name]), f"client {n} job {k}: {name} differs"


# ------------------------------------------------------------------------------------- mome segment --server


def test_cli_segment_on_the_server_equals_local(served, tmp_path, capsys):
    source = ct_file(tmp_path)
    os.environ["MOME_API_KEY"] = KEY
    try:
        code = main(
            [
                "segment",
                str(source),
                "--prompt",
                "liver, spleen",
                "-o",
                str(tmp_path / "remote.nii.gz"),
                "--server",
                served["url"],
                "--quiet",
            ]
        )
    finally:
        del os.environ["MOME_API_KEY"]
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = served["segmenter"].segment(
        read_volume(source), "liver, spleen"
    )  # what `mome segment` runs here
    write_result(result, tmp_path / "local.nii.gz", result.summary(str(source)))
    remote, local = read_volume(tmp_path / "remote.nii.gz"), read_volume(tmp_path / "local.nii.gz")
    assert sorted(np.unique(local.array)) == [0, 1, 2]
    assert np.array_equal(remote.array, local.array)
    for field in ("spacing", "origin", "direction"):
        assert np.array_equal(np.asarray(getattr(remote, field)), np.asarray(getattr(local, field))), field
    summary = json.loads((tmp_path / "remote.json").read_text())
    assert summary["input"] == str(source)
    capsys.readouterr()
    code = main(
        [
            "segment",
            str(source),
            "--prompt",
            "liver",
            "-o",
            str(tmp_path / "refused.nii.gz"),
            "--server",
            served["url"],
            "--api-key",
            "wrong-key-wrong-key",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("mome: error:") and "refused the API key" in err and "\n" not in err
    assert not (tmp_path / "refused.nii.gz").exists()


def test_explain_on_the_server_writes_the_same_maps_as_here(tmp_path):
    """`mome segment --server --explain`: the router's maps come back beside the output, renamed, and
    equal those of a local run (a real tiny network: the stub above has no router)."""
    segmenter = Segmenter(str(make_tiny_checkpoint(tmp_path)), "cpu")
    app = create_app(ServerConfig(api_key=KEY, work_dir=tmp_path / "work"), [segmenter])
    server, thread, url = start_uvicorn(app)
    try:
        source = ct_file(tmp_path)
        code = main(["segment", str(source), "--prompt", "liver, spleen", "-o", str(tmp_path / "remote.nii.gz"),
                     "--server", url, "--api-key", KEY, "--explain", "--quiet"])
        assert code == 0
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.service.close()
    local = segmenter.segment(read_volume(source), "liver, spleen", explain=True)
    summary = json.loads((tmp_path / "remote.json").read_text())
    maps = summary["explain"]["maps"]
    assert maps["folder"] == "remote_experts" and (tmp_path / maps["color_table"]).is_file()
    for k, label in enumerate(("1", "2")):
        files = maps["structures"][label]
        assert files["dominant"].startswith("remote_experts/")
        np.testing.assert_array_equal(read_volume(tmp_path / files["dominant"]).array, local.explanation.dominant[k])
        np.testing.assert_allclose(read_volume(tmp_path / files["entropy"]).array, local.explanation.entropy[k],
                                   atol=1e-6)
    assert summary["structures"][0]["routing"] == local.summary()["structures"][0]["routing"]


# ----------------------------------------------------------------------------------- a server killed mid-job

SERVER_SCRIPT = """
import sys, time, uvicorn
from MoMESegmentationLib.engine import Segmenter
from MoMESegmentationLib.server import ServerConfig, create_app
segmenter = Segmenter(sys.argv[1], "cpu", threads=1)
encode = segmenter.model.encode
segmenter.model.encode = lambda *a, **k: (time.sleep(0.5), encode(*a, **k))[1]
app = create_app(ServerConfig(api_key=sys.argv[2], work_dir=sys.argv[3]), [segmenter])
config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
server = uvicorn.Server(config)
original = server.startup
async def startup(sockets=None):
    await original(sockets)
    print(server.servers[0].sockets[0].getsockname()[1], flush=True)
server.startup = startup
server.run()
"""


def test_a_server_killed_mid_job_fails_the_job_in_one_line(served, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(served["checkpoint"]), KEY, str(tmp_path / "work")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        port = int(process.stdout.readline())
        scene = Scene(
            ct_file(tmp_path, seed=6, shape=(90, 90, 90), spacing=(2.5, 2.5, 2.5))
        )  # several windows
        workflow = SegmentationWorkflow(
            RemoteWorkerClient(f"http://127.0.0.1:{port}", KEY), scene, temp_root=tmp_path / "jobs"
        )
        job = workflow.start("volume", "liver")
        deadline = time.monotonic() + 60
        while job.stage != "inference" and time.monotonic() < deadline:
            workflow.process_events()
            time.sleep(0.02)
        assert job.stage == "inference", job.stage
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        workflow.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert job.state == JobState.FAILED
    assert "stopped answering" in job.error and "\n" not in job.error, job.error
    assert scene.segmentations == {}
    assert list((tmp_path / "jobs").iterdir()) == [], "the job's folder must be left as it was (removed)"


# ---------------------------------------------------------------------------------------- the panel's choice


def test_the_panel_logic_chooses_the_client_and_tests_the_connection(served):
    """What the Slicer panel's Run on / Test connection call (MoMESegmentation.py keeps only the widgets)."""
    from MoMESegmentationLib.remote_client import client_for, connection_report

    local = object()
    assert client_for("", KEY, lambda: local) is local
    assert client_for(None, None, lambda: local) is local
    remote = client_for(served["url"], KEY, lambda: local)
    assert isinstance(remote, RemoteWorkerClient) and remote.url == served["url"]
    with pytest.raises(ValueError):
        client_for("ftp://gpu-box", KEY, lambda: local)
    ok, message = connection_report(served["url"], KEY)
    assert ok and "model" in message and "cpu" in message, message
    for url, key, expected in ((served["url"], "wrong-key", "refused the API key"),
                               ("ftp://gpu-box", KEY, "http:// or https://"),
                               ("http://127.0.0.1:9", KEY, "cannot reach")):
        ok, message = connection_report(url, key, timeout=5)
        assert not ok and expected in message and "\n" not in message, message
