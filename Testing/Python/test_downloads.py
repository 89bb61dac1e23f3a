"""Downloads of public weights, tested against a local HTTP server (no internet).

The server answers as the Hugging Face Hub does for ``{endpoint}/{repo}/resolve/{revision}/{file}``
(HEAD and GET with ``X-Repo-Commit``, ``ETag``/``X-Linked-Etag`` = the file's SHA-256 and
``X-Linked-Size``), and as a plain web server for ``/weights.pth`` (the MONAI path). ``HF_ENDPOINT``
points huggingface_hub at it and its cache is a temporary folder.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import threading
import types
from pathlib import Path

import pytest

from MoMESegmentationLib.downloads import HubFile, download_file, download_model, downloads_dir, hub_file
from MoMESegmentationLib.errors import Cancelled, MoMEError
from MoMESegmentationLib.registry import load_registry

PAYLOAD = os.urandom(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()
COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_PATH = "/org/weights/resolve/main/weights.pth"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /weights.pth (plain) and at HUB_PATH (as the Hub); ``server.mode``:
    ``cut`` (send a third of the body once, then hang up), ``no-range`` (ignore Range),
    ``bad-etag`` (announce another SHA-256)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _head(self, status: int, start: int = 0) -> None:
        self.send_response(status)
        if self.path == HUB_PATH:
            etag = "f" * 64 if self.server.mode == "bad-etag" else SHA
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(PAYLOAD)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        self.end_headers()

    def do_HEAD(self) -> None:
        self.server.requests.append(("HEAD", self.path, dict(self.headers)))
        if self.path != HUB_PATH:
            self.send_response(404)
            if self.server.mode == "entry-not-found":  # as the Hub answers for a missing file
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Error-Message", "Entry not found")
                self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._head(200)

    def do_GET(self) -> None:
        server = self.server
        server.requests.append(("GET", self.path, dict(self.headers)))
        if self.path not in ("/weights.pth", HUB_PATH):
            self.send_error(404, "Not Found")
            return
        start = 0
        if self.headers.get("Range") and server.mode != "no-range":
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
        self._head(206 if start else 200, start)
        body = PAYLOAD[start:]
        if server.mode in ("cut", "no-range") and not server.cut_done:
            server.cut_done = True
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture()
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.requests, httpd.mode, httpd.cut_done = [], "normal", False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.url = httpd.endpoint + "/weights.pth"
    httpd.hub_url = httpd.endpoint + HUB_PATH
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def hub(server, tmp_path, monkeypatch):
    """huggingface_hub pointed at the local server, online (conftest.py sets HF_HUB_OFFLINE for the
    session), with its cache in ``tmp_path/hf-cache`` and 64 KiB blocks (progress, cancel and
    resume then happen within the 300 kB file)."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    server.cache = tmp_path / "hf-cache"
    return server


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub_blobs(cache: Path) -> list[Path]:
    return sorted(cache.glob("models--org--weights/blobs/*"))


# ----------------------------------------------------------------------------- which library
def test_hub_addresses_are_recognised(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    url = "https://huggingface.co/ljwztc/CLIP-Driven-Universal-Model/resolve/main/clip_driven.pth"
    assert hub_file(url) == HubFile("https://huggingface.co", "ljwztc/CLIP-Driven-Universal-Model", "main",
                                    "clip_driven.pth")
    assert hub_file("https://github.com/Project-MONAI/x/releases/download/0.8.1/model_swinvit.pt") is None
    assert hub_file("https://huggingface.co/ljwztc/CLIP-Driven-Universal-Model/blob/main/f.pth") is None
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example/")
    assert hub_file(url).endpoint == "https://hf-mirror.example"  # a mirror serves huggingface.co's files
    assert hub_file("https://hf-mirror.example/a/b/resolve/v1.0/sub/w.pt") == HubFile(
        "https://hf-mirror.example", "a/b", "v1.0", "sub/w.pt")


def test_registered_downloads_are_described(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    registry = load_registry()
    for name in ("universal-model", "monai-swinvit-ssl", "monai-swin-unetr-base"):
        entry = registry[name]
        assert entry.source_url.startswith("https://") and entry.license and entry.source_file
    assert hub_file(registry["universal-model"].source_url) is not None  # huggingface_hub
    assert hub_file(registry["monai-swinvit-ssl"].source_url) is None  # MONAI's download_url
    with pytest.raises(MoMEError, match="nothing to download"):
        download_model("demo", yes=True, echo=lambda s: None)


# ---------------------------------------------------------------------------------- the Hub
def test_hub_file_goes_to_the_cache_and_is_linked_from_the_store(hub, tmp_path):
    destination = tmp_path / "store" / "downloads" / "weights.pth"
    result = download_file(hub.hub_url, destination, progress=False)
    assert result.path == destination and destination.is_symlink() and destination.read_bytes() == PAYLOAD
    assert result.cache == destination.resolve().parent.parent.parent / "snapshots" / COMMIT / "weights.pth" \
        or result.cache.resolve() == destination.resolve()
    assert [blob.name for blob in hub_blobs(hub.cache)] == [SHA]  # stored under its SHA-256
    assert result.sha256 == SHA and result.bytes == len(PAYLOAD) == result.downloaded
    assert [(method, path) for method, path, _ in hub.requests] == [("HEAD", HUB_PATH), ("GET", HUB_PATH)]

    again = download_file(hub.hub_url, destination, progress=False)
    assert again.downloaded == 0 and len(hub.requests) == 2  # complete files are not fetched again

    destination.unlink()  # the cache still has it: found there without the network
    hub.shutdown()
    hub.server_close()
    offline = download_file(hub.hub_url, destination, progress=False)
    assert offline.downloaded == 0 and destination.read_bytes() == PAYLOAD and offline.sha256 == SHA


def test_hub_connection_cut_off_is_resumed_within_the_call(hub, tmp_path):
    hub.mode = "cut"
    result = download_file(hub.hub_url, tmp_path / "w.pth", progress=False)
    assert result.path.read_bytes() == PAYLOAD and result.sha256 == SHA
    gets = [headers for method, _, headers in hub.requests if method == "GET"]
    assert len(gets) == 2 and "Range" not in gets[0]
    assert gets[1]["Range"].startswith("bytes=") and gets[1]["Range"] != "bytes=0-"  # resumed, not restarted


def test_hub_server_ignoring_range_gives_the_whole_file_again(hub, tmp_path):
    hub.mode = "no-range"
    result = download_file(hub.hub_url, tmp_path / "w.pth", progress=False)
    assert result.path.read_bytes() == PAYLOAD and result.sha256 == SHA


def test_hub_file_is_checked_against_the_hubs_sha256(hub, tmp_path):
    hub.mode = "bad-etag"
    with pytest.raises(MoMEError, match="is not the Hub's") as info:
        download_file(hub.hub_url, tmp_path / "w.pth", progress=False)
    assert "\n" not in str(info.value)
    assert hub_blobs(hub.cache) == [] and not (tmp_path / "w.pth").exists()


def test_hub_progress_callback_and_cancel(hub, tmp_path):
    seen: list[tuple[int, int | None]] = []
    download_file(hub.hub_url, tmp_path / "w.pth", progress=False, on_progress=lambda *a: seen.append(a))
    assert len(seen) > 2 and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)

    for blob in hub_blobs(hub.cache):
        blob.unlink()
    for link in hub.cache.glob("models--org--weights/snapshots/*/*"):
        link.unlink()
    seen.clear()
    with pytest.raises(Cancelled, match="cancelled after"):
        download_file(hub.hub_url, tmp_path / "c.pth", progress=False, on_progress=lambda *a: seen.append(a),
                      cancel=lambda: bool(seen))
    assert len(seen) == 1 and not (tmp_path / "c.pth").exists()
    assert hub_blobs(hub.cache) == []  # huggingface_hub keeps no partial file


def test_hub_offline_gives_one_clear_line(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants
    import huggingface_hub.utils._http as hub_http

    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    # huggingface_hub waits 1+2+4+8+8 s between its tries; the answer is the same without waiting
    monkeypatch.setattr(hub_http, "time", types.SimpleNamespace(sleep=lambda seconds: None), raising=False)
    with pytest.raises(MoMEError) as info:
        download_file(endpoint + HUB_PATH, tmp_path / "w.pth", progress=False)
    message = str(info.value)
    assert message.startswith("cannot reach 127.0.0.1:") and "no network connection" in message
    assert "mome import" in message and "\n" not in message
    assert not (tmp_path / "w.pth").exists()


def test_hub_offline_mode_uses_the_cache_and_never_connects(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MoMEError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set.*import"):
        download_file(hub.hub_url, tmp_path / "w.pth", progress=False)
    assert hub.requests == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    download_file(hub.hub_url, tmp_path / "first.pth", progress=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    requests = len(hub.requests)
    assert download_file(hub.hub_url, tmp_path / "w.pth", progress=False).path.read_bytes() == PAYLOAD
    assert len(hub.requests) == requests


@pytest.mark.parametrize("mode", ["normal", "entry-not-found"])
def test_hub_http_error_is_reported(hub, tmp_path, mode):
    hub.mode = mode
    with pytest.raises(MoMEError, match="HTTP 404") as info:
        download_file(hub.hub_url.replace("weights.pth", "missing.pth"), tmp_path / "w.pth", progress=False)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- off the Hub (MONAI)
def test_download_whole_file(server, tmp_path):
    result = download_file(server.url, tmp_path / "w.pth", expected_size=len(PAYLOAD), progress=False)
    assert result.path.read_bytes() == PAYLOAD and result.sha256 == SHA and not result.path.is_symlink()
    again = download_file(server.url, tmp_path / "w.pth", expected_size=len(PAYLOAD), progress=False)
    assert again.downloaded == 0 and len(server.requests) == 1  # complete files are not fetched again


def test_size_and_checksum_are_checked(server, tmp_path):
    with pytest.raises(MoMEError, match="expected 123"):
        download_file(server.url, tmp_path / "a.pth", expected_size=123, progress=False)
    assert not (tmp_path / "a.pth").exists()
    with pytest.raises(MoMEError, match="SHA-256"):
        download_file(server.url, tmp_path / "b.pth", expected_sha256="0" * 64, progress=False)
    assert not (tmp_path / "b.pth").exists()


def test_offline_gives_one_clear_line(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/weights.pth"
    with pytest.raises(MoMEError) as info:
        download_file(url, tmp_path / "w.pth", progress=False)
    message = str(info.value)
    assert message.startswith("cannot reach 127.0.0.1:") and "no network connection" in message
    assert "mome import" in message and "\n" not in message
    assert not (tmp_path / "w.pth").exists()


def test_http_error_is_reported(server, tmp_path):
    with pytest.raises(MoMEError, match="HTTP 404"):
        download_file(server.url.replace("weights", "missing"), tmp_path / "w.pth", progress=False)


# ------------------------------------------------------------------------------ download_model
def _registry(tmp_path: Path, url: str, size: int = 0, sha256: str = ""):
    rows = {"format": 1, "models": [{
        "name": "test-weights", "title": "Test weights", "kind": "imported",
        "license": "CC BY-NC-ND 4.0 (test)", "source_url": url, "source_file": "weights.pth",
        "source_size": size, "checkpoint": "test-weights/test-weights.safetensors",
        "import_command": "mome import universal-model weights.pth", "source_sha256": sha256,
    }]}  # fmt: skip
    path = tmp_path / "models.json"
    path.write_text(json.dumps(rows))
    return load_registry(path)


@pytest.mark.parametrize("where", ["hub", "elsewhere"])
def test_download_model_shows_license_and_asks_first(hub, tmp_path, where):
    url = hub.hub_url if where == "hub" else hub.url
    registry = _registry(tmp_path, url, size=len(PAYLOAD))
    said: list[str] = []
    with pytest.raises(MoMEError, match="cancelled"):
        download_model(
            "test-weights",
            store=tmp_path,
            registry=registry,
            echo=said.append,
            confirm=lambda question: False,
            progress=False,
        )
    assert hub.requests == []  # nothing fetched before the user agreed
    assert "CC BY-NC-ND 4.0 (test)" in said[0] and url in said[0]

    questions: list[str] = []
    said.clear()
    path = download_model(
        "test-weights",
        store=tmp_path,
        registry=registry,
        echo=said.append,
        confirm=lambda q: questions.append(q) or True,
        progress=False,
    )
    assert path == downloads_dir(tmp_path) / "weights.pth" and path.read_bytes() == PAYLOAD
    assert len(questions) == 1 and "license" in questions[0]
    assert ("Hugging Face cache" in questions[0]) == (where == "hub")
    assert "CC BY-NC-ND 4.0 (test)" in said[0]
    assert f"sha256 {SHA}" in said
    assert any(line.startswith("next: mome import universal-model") and str(path) in line for line in said)
    assert any("in the Hugging Face cache" in line for line in said) == (where == "hub")


def test_download_model_checks_the_registry_sha256(server, tmp_path):
    wrong = _registry(tmp_path, server.url, sha256="F" * 64)
    assert wrong["test-weights"].source_sha256 == "f" * 64
    with pytest.raises(MoMEError, match="SHA-256"):
        download_model("test-weights", store=tmp_path, yes=True, registry=wrong, echo=lambda s: None,
                       progress=False)
    assert not downloads_dir(tmp_path).joinpath("weights.pth").exists()
    right = _registry(tmp_path, server.url, sha256=SHA)
    path = download_model("test-weights", store=tmp_path, yes=True, registry=right, echo=lambda s: None,
                          progress=False)
    assert path.read_bytes() == PAYLOAD


def test_download_model_checks_the_registry_sha256_of_a_hub_file(hub, tmp_path):
    wrong = _registry(tmp_path, hub.hub_url, sha256="F" * 64)
    with pytest.raises(MoMEError, match="SHA-256 .* is not the expected ffffffffffff"):
        download_model("test-weights", store=tmp_path, yes=True, registry=wrong, echo=lambda s: None,
                       progress=False)


def test_download_model_needs_yes_without_a_terminal(server, tmp_path, monkeypatch):
    import io

    registry = _registry(tmp_path, server.url)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(MoMEError, match="--yes"):
        download_model("test-weights", store=tmp_path, registry=registry, echo=lambda s: None, progress=False)
    assert server.requests == []
    path = download_model(
        "test-weights", store=tmp_path, yes=True, registry=registry, echo=lambda s: None, progress=False
    )
    assert path.read_bytes() == PAYLOAD


def test_cli_models_download(hub, tmp_path, monkeypatch, capsys):
    from MoMESegmentationLib.cli import main

    registry = _registry(tmp_path, hub.hub_url, size=len(PAYLOAD))
    monkeypatch.setattr("MoMESegmentationLib.downloads.load_registry", lambda: registry)
    assert main(["models", "download", "test-weights", "--yes", "--store", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "CC BY-NC-ND 4.0 (test)" in err and SHA in err
    assert (tmp_path / "downloads" / "weights.pth").read_bytes() == PAYLOAD
