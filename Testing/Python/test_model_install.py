"""Installing models into the store: ``install_model`` and ``mome models install``.

The public Universal Model file cannot be downloaded in tests: a file with exactly its tensor
names and shapes is built as in ``test_importers.py`` (random values) and installed from disk and
from a local HTTP server. What must hold: the license is asked first and declining writes nothing;
downloads are checked against the registry's SHA-256; a failure half-way (or at the final rename)
leaves the store as it was; bad files give one line naming the file.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine_fixtures import TINY_STRUCTURES, make_tiny_checkpoint
from MoMESegmentationLib.cli import main
from MoMESegmentationLib.errors import Cancelled, CheckpointError, MoMEError
from MoMESegmentationLib.model_install import (
    STAGING_PREFIX,
    InstallJob,
    install_command,
    install_model,
    model_choices,
    plan_install,
    suggest_install_name,
)
from MoMESegmentationLib.registry import load_registry, resolve_model
from test_importers import fake_universal_state, save_public_layout

REPO = Path(__file__).resolve().parents[2]
UM = "universal-model"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------- helpers
def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with the SHA-256 of its content ("" for folders)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "")
            for p in sorted(folder.rglob("*"))}


def one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("mome: error:") and "\n" not in err, err
    for name in names:
        assert name in err, err
    return err


HUB_PATH = "/org/universal/resolve/main/weights.pth"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.payload`` at /weights.pth and, answering as the Hugging Face Hub does, at
    HUB_PATH (Range supported); ``server.delay`` slows each 64 KiB; ``server.sent`` counts bytes."""

    def log_message(self, *args) -> None:
        pass

    def _head(self, status: int, start: int = 0) -> None:
        payload = self.server.payload
        self.send_response(status)
        if self.path == HUB_PATH:
            digest = hashlib.sha256(payload).hexdigest()
            self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
            self.send_header("ETag", f'"{digest}"')
            self.send_header("X-Linked-Etag", f'"{digest}"')
            self.send_header("X-Linked-Size", str(len(payload)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        self.send_header("Content-Length", str(len(payload) - start))
        self.end_headers()

    def do_HEAD(self) -> None:
        self.server.requests.append("HEAD " + self.path)
        if self.path != HUB_PATH:
            self.send_error(404, "Not Found")
            return
        self._head(200)

    def do_GET(self) -> None:
        server = self.server
        server.requests.append(self.path)
        if self.path not in ("/weights.pth", HUB_PATH):
            self.send_error(404, "Not Found")
            return
        payload = server.payload
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self._head(206 if start else 200, start)
        try:
            for offset in range(start, len(payload), 1 << 16):
                self.wfile.write(payload[offset:offset + (1 << 16)])
                server.sent += len(payload[offset:offset + (1 << 16)])
                if server.delay:
                    self.wfile.flush()
                    time.sleep(server.delay)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture()
def server(tmp_path, monkeypatch):
    """The local server; huggingface_hub is pointed at it (``HF_ENDPOINT``, online, its cache in
    ``tmp_path/hf-cache``); ``server.env`` is the same for a child process."""
    import huggingface_hub.constants as constants

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.requests, httpd.payload, httpd.delay, httpd.sent = [], b"", 0.0, 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.url, httpd.hub_url = endpoint + "/weights.pth", endpoint + HUB_PATH
    httpd.cache = tmp_path / "hf-cache"
    httpd.env = {"HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(httpd.cache), "HF_HUB_OFFLINE": "0"}
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(httpd.cache))
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def registry_file(tmp_path: Path, url: str, sha256: str = "") -> Path:
    """The bundled registry with the Universal Model's address (and SHA-256) replaced."""
    data = json.loads((REPO / "Resources" / "models.json").read_text())
    for row in data["models"]:
        if row["name"] == UM:
            row.update(source_url=url, source_file="weights.pth", source_sha256=sha256)
    path = tmp_path / "models.json"
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def public_file(tmp_path_factory) -> Path:
    """A file with the published Universal Model layout (random values), as its train.py saves it."""
    folder = tmp_path_factory.mktemp("public")
    return save_public_layout(fake_universal_state(seed=0), folder / "clip_driven_universal_swin_unetr.pth")


@pytest.fixture(scope="module")
def installed(tmp_path_factory, public_file):
    """``install_model`` from the local .pth into a fresh store; returns (store, path, progress calls)."""
    store = tmp_path_factory.mktemp("store")
    calls: list[tuple[float, str, str]] = []
    path = install_model(UM, public_file, store=store, yes=True, progress=lambda *a: calls.append(a))
    return store, path, calls


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A small MoME checkpoint (.safetensors + .json) of the user's own."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


# ---------------------------------------------------------------------------- from a local .pth
def test_install_from_pth_converts_into_the_store(installed, public_file):
    store, path, calls = installed
    assert path == store / UM / f"{UM}.safetensors" and path.is_file()
    assert resolve_model(UM, store) == path
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["provenance"]["source_sha256"] == hashlib.sha256(public_file.read_bytes()).hexdigest()
    assert len(meta["structures"]) == 32
    assert sorted(p.name for p in store.iterdir()) == [UM]  # no staging folder, no download left
    stages = [stage for _, stage, _ in calls]
    assert stages[0] == "convert" and stages[-2:] == ["install", "done"]
    fractions = [fraction for fraction, _, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert UM in [c.name for c in model_choices(store) if c.installed]


def test_cli_install_from_pth(public_file, installed, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["models", "install", UM, "--file", str(public_file), "--yes", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    path = store / UM / f"{UM}.safetensors"
    assert f"installed {UM}: {path}" in out
    meta, first = (json.loads(p.with_suffix(".json").read_text()) for p in (path, installed[1]))
    assert meta["provenance"]["source_sha256"] == first["provenance"]["source_sha256"]
    assert meta["structures"] == first["structures"] and meta["weights"]["bytes"] == first["weights"]["bytes"]
    assert main(["models", "--store", str(store)]) == 0
    listing = capsys.readouterr().out
    row = next(line for line in listing.splitlines() if line.startswith(UM))
    assert row.split()[2] == "yes"


# ----------------------------------------------------------------------------------- download
@pytest.mark.parametrize("where", ["hub", "elsewhere"])
def test_install_by_download_checks_sha256(server, public_file, tmp_path, where):
    server.payload = public_file.read_bytes()
    good = hashlib.sha256(server.payload).hexdigest()
    url = server.hub_url if where == "hub" else server.url

    bad_store = tmp_path / "bad"
    wrong = load_registry(registry_file(tmp_path, url, sha256="0" * 64))
    with pytest.raises(MoMEError, match="SHA-256") as info:
        install_model(UM, store=bad_store, yes=True, registry=wrong)
    assert "\n" not in str(info.value) and url in str(info.value)
    assert not bad_store.exists()  # the download (or its link) was removed with the staging folder
    shutil.rmtree(server.cache, ignore_errors=True)  # downloaded again below, with its progress

    store = tmp_path / "store"
    right = load_registry(registry_file(tmp_path, url, sha256=good))
    calls: list[tuple[float, str, str]] = []
    path = install_model(UM, store=store, yes=True, registry=right, progress=lambda *a: calls.append(a))
    assert resolve_model(UM, store) == path
    assert json.loads(path.with_suffix(".json").read_text())["provenance"]["source_sha256"] == good
    assert sorted(p.name for p in store.iterdir()) == [UM]
    downloads = [c for c in calls if c[1] == "download"]
    assert downloads and downloads[-1][2].startswith(f"{len(server.payload) / 1e6:.1f} of")
    assert [c[1] for c in calls].index("verify") < [c[1] for c in calls].index("convert")

    requests = len(server.requests)  # installed: a second call downloads nothing
    assert install_model(UM, store=store, yes=True, registry=right) == path
    assert len(server.requests) == requests


def test_license_is_asked_first_and_declining_writes_nothing(server, tmp_path, capsys, monkeypatch):
    import io

    server.payload = b"never sent"
    registry = load_registry(registry_file(tmp_path, server.url))
    store = tmp_path / "store"
    questions: list[str] = []
    with pytest.raises(Cancelled, match="license was not accepted"):
        install_model(UM, store=store, registry=registry, ask=lambda q: questions.append(q) or False)
    assert server.requests == [] and not store.exists()
    assert len(questions) == 1 and "CC BY-NC-ND 4.0" in questions[0] and "127.0.0.1" in questions[0]

    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no terminal and no --yes: refuse, write nothing
    registry_path = registry_file(tmp_path, server.url)
    code = main(["models", "install", UM, "--store", str(store), "--registry", str(registry_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "CC BY-NC-ND 4.0" in "\n".join(err[:-1])  # the license is shown, then one error line
    assert err[-1].startswith("mome: error:") and "--yes" in err[-1]
    assert server.requests == [] and not store.exists()


# ---------------------------------------------------------------------------- nothing half-done
def test_failure_half_way_leaves_the_store_as_it_was(installed, public_file, tmp_path, monkeypatch):
    """A conversion that has written its files and then fails: the earlier installation stays."""
    import shutil

    import MoMESegmentationLib.importers.universal_model as universal_model

    store = tmp_path / "store"
    shutil.copytree(installed[0], store)
    (store / "notes.txt").write_text("the user's own file")
    before = snapshot(store)
    written: list[Path] = []

    def fail_after_writing(json_path: Path) -> None:
        written.extend([json_path, json_path.with_suffix(".safetensors")])
        assert all(p.is_file() for p in written)
        raise OSError("disk full")

    monkeypatch.setattr(universal_model, "_record_architecture", fail_after_writing)
    with pytest.raises(OSError, match="disk full"):
        install_model(UM, public_file, store=store, yes=True)
    assert written and written[0].parent.parent.name.startswith(STAGING_PREFIX)  # it failed half-way
    assert snapshot(store) == before


def test_failure_at_the_final_rename_restores_the_earlier_installation(tiny, tmp_path, monkeypatch):
    store = tmp_path / "store"
    install_model("mine", tiny, store=store)
    before = snapshot(store)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).parent.name.startswith(STAGING_PREFIX) and Path(src).name == "mine":
            raise PermissionError("folder in use")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PermissionError):
        install_model("mine", tiny, store=store)
    assert snapshot(store) == before


# ------------------------------------------------------------------------ MoME checkpoints
def test_cli_adds_a_safetensors_checkpoint_under_its_own_name(tiny, tmp_path, capsys):
    from MoMESegmentationLib.checkpoint import load_checkpoint
    from MoMESegmentationLib.registry import installed_models

    store = tmp_path / "store"
    stale = store / f"{STAGING_PREFIX}999999999-mine-x"  # left by a killed installation
    (stale / "mine").mkdir(parents=True)
    assert main(["models", "install", "mine", "--file", str(tiny), "--store", str(store)]) == 0
    path = store / "mine" / "mine.safetensors"
    assert f"installed mine: {path}" in capsys.readouterr().out
    assert sorted(p.name for p in store.iterdir()) == ["mine"]
    assert json.loads(path.with_suffix(".json").read_text())["weights"]["file"] == "mine.safetensors"
    assert load_checkpoint(path).structures == list(TINY_STRUCTURES)
    assert resolve_model("mine", store) == path
    assert [(m.name, m.kind) for m in installed_models(store) if m.name == "mine"] == [("mine", "local")]
    assert [(c.name, c.installed, c.downloadable) for c in model_choices(store)][-1] == ("mine", True, False)
    assert main(["models", "--store", str(store)]) == 0
    assert any(line.startswith("mine") and "local" in line for line in capsys.readouterr().out.splitlines())


def test_a_registered_model_takes_only_its_own_checkpoint(tiny, installed, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["models", "install", UM, "--file", str(tiny), "--yes", "--store", str(store)]) == 2
    assert "not a checkpoint of 'universal-model'" in one_line_error(capsys, str(tiny))
    assert not store.exists()
    path = install_model(UM, installed[1], store=store, yes=True)  # the converted one is
    assert resolve_model(UM, store) == path


def _text(path: Path) -> Path:
    path.write_text("these are not weights\n")
    return path


@pytest.mark.parametrize("case", ["text.pth", "truncated.pth", "text.safetensors", "truncated.safetensors",
                                  "alone.safetensors", "notes.txt", "missing.pth"])
def test_bad_files_give_one_line_naming_the_file(case, public_file, tiny, tmp_path, capsys):
    import shutil

    file = tmp_path / case
    if case == "text.pth" or case == "notes.txt":
        _text(file)
    elif case == "truncated.pth":
        with open(public_file, "rb") as f:
            file.write_bytes(f.read(2_000_000))
    elif case == "text.safetensors":
        _text(file)
        shutil.copy(tiny.with_suffix(".json"), file.with_suffix(".json"))
    elif case == "truncated.safetensors":
        file.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
        meta = json.loads(tiny.with_suffix(".json").read_text())
        meta["weights"]["file"] = file.name
        file.with_suffix(".json").write_text(json.dumps(meta))
    elif case == "alone.safetensors":
        shutil.copy(tiny, file)
    name = UM if case.endswith((".pth", ".txt")) else "mine"
    store = tmp_path / "store"
    assert main(["models", "install", name, "--file", str(file), "--yes", "--store", str(store)]) == 2
    one_line_error(capsys, case)
    assert not store.exists()


# ------------------------------------------------------------------------------ Slicer glue
def test_panel_decisions(tiny, tmp_path):
    registry = load_registry()
    choices = {c.name: c for c in model_choices(tmp_path / "empty")}
    assert choices["demo"].installed and not choices["demo"].downloadable
    assert not choices[UM].installed and choices[UM].downloadable
    assert "monai-swinvit-ssl" not in choices  # backbones are not segmentation models
    assert suggest_install_name(tmp_path / "clip.pth", None, registry) == UM
    assert suggest_install_name(tiny, None, registry) == "tiny"
    assert suggest_install_name(tmp_path / "run1" / "model.safetensors") == "run1"
    assert suggest_install_name(tmp_path / "demo.safetensors") == "demo-local"
    plan = plan_install(UM, store=tmp_path)
    assert plan.action == "download" and "CC BY-NC-ND 4.0" in plan.question and not plan.installed
    assert plan_install("mine", tiny, store=tmp_path).question is None  # nothing to accept for your own file
    for name, file, message in (("demo", None, "ships with"),
                                ("monai-swinvit-ssl", None, "not a segmentation"),
                                ("nope", None, "unknown model"), ("bad name", tiny, "model name"),
                                ("mine", tmp_path / "clip.pth", "not found")):
        with pytest.raises(MoMEError, match=message):
            plan_install(name, file, store=tmp_path)
    assert install_command("PythonSlicer", UM)[-4:] == ["install", UM, "--yes", "--progress-json"]


def test_registry_rejects_a_malformed_sha256(tmp_path):
    path = registry_file(tmp_path, "http://127.0.0.1/w.pth", sha256="abc")
    with pytest.raises(CheckpointError, match="malformed source_sha256"):
        load_registry(path)


def test_panel_helpers_do_not_import_torch(tiny, tmp_path):
    code = ("import sys; from MoMESegmentationLib.model_install import model_choices, plan_install, "
            "suggest_install_name, InstallJob, install_command; "
            f"model_choices({str(tmp_path)!r}); plan_install('universal-model', store={str(tmp_path)!r}); "
            f"suggest_install_name({str(tiny)!r}); "
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def _job(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> InstallJob:
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return InstallJob(install_command(sys.executable, *args[:1], store=tmp_path / "store") + args[1:],
                      env=env, cwd=REPO, cancel_grace_s=20).start()


def test_background_job_cancels_a_download(server, tmp_path):
    """What the panel runs: the CLI in a child process, JSON progress, 'cancel' on stdin; the Hub
    download stops between two of huggingface_hub's 10 MiB blocks, before the file is complete."""
    server.payload = os.urandom(48 << 20)
    server.delay = 0.01  # 64 KiB every 10 ms: the download would take about 8 s
    job = _job([UM, "--registry", str(registry_file(tmp_path, server.hub_url))], tmp_path, server.env)
    deadline = time.monotonic() + 60
    while job.running and not job.message.endswith(" MB") and time.monotonic() < deadline:
        job.poll()  # until bytes arrive
        time.sleep(0.05)
    assert job.stage == "download" and job.running
    cancelled_at = time.monotonic()
    job.cancel()
    assert job.wait(timeout=30) == "cancelled"
    assert time.monotonic() - cancelled_at < 8  # the child stopped by itself, well before the kill
    assert job.returncode == 2 and job.path is None
    assert not (tmp_path / "store").exists()
    assert server.sent < len(server.payload) and not list(server.cache.glob("*/blobs/*"))  # no partial file


def test_background_job_installs_a_checkpoint(tiny, tmp_path):
    job = _job(["mine", "--file", str(tiny)], tmp_path)
    events = []
    deadline = time.monotonic() + 60
    while job.running and time.monotonic() < deadline:
        events += job.poll()
        time.sleep(0.05)
    assert job.state == "done", job.error
    assert Path(job.path) == tmp_path / "store" / "mine" / "mine.safetensors" and job.fraction == 1.0
    assert [e["event"] for e in events if e["event"] != "log"][-2:] == ["done", "finished"]

    bad = _job(["mine", "--file", str(_text(tmp_path / "notes.txt"))], tmp_path)
    assert bad.wait(timeout=60) == "failed"
    assert bad.error.startswith(f"{tmp_path / 'notes.txt'}: not a model file") and "\n" not in bad.error
