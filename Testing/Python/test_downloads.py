"""Downloads of public weights, tested against a local HTTP server (no internet)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import threading
from pathlib import Path

import pytest

from MoMESegmentationLib.downloads import download_file, download_model, downloads_dir
from MoMESegmentationLib.errors import Cancelled, MoMEError
from MoMESegmentationLib.registry import load_registry

PAYLOAD = os.urandom(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /weights.pth with Range support; ``server.mode`` changes its behaviour."""

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        server = self.server
        server.requests.append(dict(self.headers))
        if self.path != "/weights.pth":
            self.send_error(404, "Not Found")
            return
        start = 0
        header = self.headers.get("Range")
        if header and server.mode != "no-range":
            start = int(header.split("=")[1].split("-")[0])
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.mode == "cut":  # promise everything, send a part, hang up
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            server.mode = "normal"
            return
        self.wfile.write(body)


@pytest.fixture()
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests = []
    httpd.mode = "normal"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/weights.pth"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_whole_file(server, tmp_path):
    result = download_file(server.url, tmp_path / "w.pth", expected_size=len(PAYLOAD), progress=False)
    assert result.path.read_bytes() == PAYLOAD and result.sha256 == SHA and result.resumed_from == 0
    assert not (tmp_path / "w.pth.part").exists()
    again = download_file(server.url, tmp_path / "w.pth", expected_size=len(PAYLOAD), progress=False)
    assert again.downloaded == 0 and len(server.requests) == 1  # complete files are not fetched again


def test_resume_from_part_file(server, tmp_path):
    (tmp_path / "w.pth.part").write_bytes(PAYLOAD[:100_000])
    result = download_file(server.url, tmp_path / "w.pth", expected_size=len(PAYLOAD), progress=False)
    assert server.requests[0]["Range"] == "bytes=100000-"
    assert result.resumed_from == 100_000 and result.downloaded == len(PAYLOAD) - 100_000
    assert (tmp_path / "w.pth").read_bytes() == PAYLOAD and result.sha256 == SHA


def test_restart_when_server_ignores_range(server, tmp_path):
    server.mode = "no-range"
    (tmp_path / "w.pth.part").write_bytes(b"x" * 1000)
    result = download_file(server.url, tmp_path / "w.pth", progress=False)
    assert result.resumed_from == 0 and (tmp_path / "w.pth").read_bytes() == PAYLOAD


def test_interrupted_download_resumes_on_the_next_call(server, tmp_path):
    server.mode = "cut"
    with pytest.raises(MoMEError, match="again to resume") as info:
        download_file(server.url, tmp_path / "w.pth", expected_size=len(PAYLOAD), progress=False)
    assert "\n" not in str(info.value)
    partial = (tmp_path / "w.pth.part").stat().st_size
    assert 0 < partial < len(PAYLOAD)
    result = download_file(server.url, tmp_path / "w.pth", expected_size=len(PAYLOAD), progress=False)
    assert result.resumed_from == partial and (tmp_path / "w.pth").read_bytes() == PAYLOAD


def test_size_and_checksum_are_checked(server, tmp_path):
    with pytest.raises(MoMEError, match="expected 123"):
        download_file(server.url, tmp_path / "a.pth", expected_size=123, progress=False)
    with pytest.raises(MoMEError, match="SHA-256"):
        download_file(server.url, tmp_path / "b.pth", expected_sha256="0" * 64, progress=False)
    assert not (tmp_path / "b.pth").exists()


def test_progress_callback_and_cancel(server, tmp_path):
    seen: list[tuple[int, int | None]] = []
    download_file(server.url, tmp_path / "w.pth", progress=False, on_progress=lambda *a: seen.append(a))
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    seen.clear()
    with pytest.raises(Cancelled, match="cancelled after"):
        download_file(server.url, tmp_path / "c.pth", progress=False, on_progress=lambda *a: seen.append(a),
                      cancel=lambda: bool(seen))
    assert len(seen) == 1 and not (tmp_path / "c.pth").exists()
    assert (tmp_path / "c.pth.part").stat().st_size == seen[0][0]  # kept: the next call resumes


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


def test_download_model_shows_license_and_asks_first(server, tmp_path):
    registry = _registry(tmp_path, server.url, size=len(PAYLOAD))
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
    assert server.requests == []  # nothing fetched before the user agreed
    assert "CC BY-NC-ND 4.0 (test)" in said[0] and server.url in said[0]

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
    assert "CC BY-NC-ND 4.0 (test)" in said[0]
    assert f"sha256 {SHA}" in said
    assert any(line.startswith("next: mome import universal-model") and str(path) in line for line in said)


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


def test_cli_models_download(server, tmp_path, monkeypatch, capsys):
    from MoMESegmentationLib.cli import main

    registry = _registry(tmp_path, server.url, size=len(PAYLOAD))
    monkeypatch.setattr("MoMESegmentationLib.downloads.load_registry", lambda: registry)
    assert main(["models", "download", "test-weights", "--yes", "--store", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "CC BY-NC-ND 4.0 (test)" in err and SHA in err
    assert (tmp_path / "downloads" / "weights.pth").read_bytes() == PAYLOAD


def test_registered_downloads_are_described():
    registry = load_registry()
    for name in ("universal-model", "monai-swinvit-ssl", "monai-swin-unetr-base"):
        entry = registry[name]
        assert entry.source_url.startswith("https://") and entry.license and entry.source_file
    with pytest.raises(MoMEError, match="nothing to download"):
        download_model("demo", yes=True, echo=lambda s: None)
