"""Session processes of ``mome web``: one per browser visit, each with its own scene, worker and folder.

A session is a trame-slicer process (``python -m MoMESlicer.web_app``) listening on a loopback port
that only the front knows, with a random secret the browser gets from the front. Its folder (made
``0700`` under the server's work folder) holds its uploads, job files and results, and nothing else
does: two sessions never share a scene, a worker or a file. The session process leaves by itself a
while after its last browser tab closed; its folder is removed then, by the process and again by
:meth:`SessionManager.reap`, and every session is ended when the server stops.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import MoMEError

__all__ = ["WebConfig", "Session", "SessionManager", "SessionLimitError", "SESSION_HEADER"]

logger = logging.getLogger(__name__)

#: The session process writes this into its folder once it listens: ``{"port": N}``.
READY_FILE = "ready.json"
CONFIG_FILE = "session.json"
SECRET_FILE = "secret"
#: The front sends the session's secret in this header; the session's upload and download routes check it.
SESSION_HEADER = "X-MoME-Session"


class SessionLimitError(MoMEError):
    """The server already runs its largest number of sessions."""


@dataclass
class WebConfig:
    """What ``mome web`` runs with."""

    host: str = "127.0.0.1"
    port: int = 8780
    access_key: str | None = None  # needed for anything but a loopback address
    data_dir: str | None = None  # server-side folder of scans offered in the page
    model: str = "demo"
    device: str = "auto"
    threads: int | None = None
    max_upload_bytes: int = 1_000_000_000
    max_voxels: int = 512 * 512 * 1500
    max_sessions: int = 4
    session_timeout_s: int = 60  # a session ends this long after its last browser tab closed
    startup_timeout_s: float = 120.0
    work_dir: str | None = None  # parent of the session folders (default: the system's temp folder)

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_voxels", "max_sessions", "session_timeout_s"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.access_key is not None and not self.access_key.strip():
            self.access_key = None

    def session_settings(self) -> dict:
        """What a session process needs (the access key stays with the front)."""
        settings = asdict(self)
        settings.pop("access_key")
        return settings


@dataclass
class Session:
    id: str
    folder: Path
    secret: str
    process: subprocess.Popen
    port: int | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


def session_command() -> list[str]:
    return [sys.executable, "-m", "MoMESlicer.web_app"]


def _session_environment() -> dict[str, str]:
    """The session's environment: the MoMESlicer package importable also from a source checkout."""
    env = dict(os.environ)
    module_dir = Path(__file__).resolve().parents[2] / "MoMESegmentation"
    if (module_dir / "MoMESlicer" / "web_app.py").is_file():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(module_dir), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TRAME_DISABLE_V2_WARNING", "1")
    return env


class SessionManager:
    """Start, find and end session processes."""

    def __init__(self, config: WebConfig, command: list[str] | None = None) -> None:
        self.config = config
        self.command = command or session_command()
        root = Path(config.work_dir) if config.work_dir else None
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="mome-web-", dir=root))
        os.chmod(self.root, 0o700)
        self.sessions: dict[str, Session] = {}

    def create(self) -> Session:
        """Start a session process (returns at once; see :meth:`wait_ready`)."""
        self.reap()
        if len(self.sessions) >= self.config.max_sessions:
            raise SessionLimitError(f"this server already runs its limit of {self.config.max_sessions} "
                                    "sessions; close a tab or try again in a minute")
        session_id = secrets.token_urlsafe(16)
        folder = self.root / session_id
        folder.mkdir(mode=0o700)
        secret = secrets.token_urlsafe(24)
        (folder / SECRET_FILE).write_text(secret, encoding="utf-8")
        os.chmod(folder / SECRET_FILE, 0o600)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config.session_settings()), encoding="utf-8")
        log = open(folder / "session.log", "ab")  # noqa: SIM115 - the child holds it
        try:
            process = subprocess.Popen(
                [*self.command, "--session-dir", str(folder), "--authKeyFile", str(folder / SECRET_FILE),
                 "--host", "127.0.0.1", "--port", "0", "--server"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_session_environment(),
                start_new_session=True)
        except OSError as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise MoMEError(f"cannot start a session process: {error}") from None
        finally:
            log.close()
        session = Session(session_id, folder, secret, process)
        self.sessions[session_id] = session
        logger.info("session %s started (pid %d)", session_id[:6], process.pid)
        return session

    def poll_ready(self, session: Session) -> bool:
        """True once the session listens (its port known); raises when it died on the way."""
        if session.port is not None:
            return True
        ready = session.folder / READY_FILE
        if ready.is_file():
            try:
                session.port = int(json.loads(ready.read_text(encoding="utf-8"))["port"])
                return True
            except (ValueError, KeyError, OSError):
                pass  # being written
        if not session.alive:
            tail = self.log_tail(session)
            self.end(session.id)
            raise MoMEError(f"the session process ended at start-up: {tail or 'no message'}")
        if time.monotonic() - session.started > self.config.startup_timeout_s:
            self.end(session.id)
            raise MoMEError(f"the session process did not start within {self.config.startup_timeout_s:.0f} s")
        return False

    @staticmethod
    def log_tail(session: Session) -> str:
        try:
            lines = (session.folder / "session.log").read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        lines = [line.strip() for line in lines if line.strip()]
        return lines[-1][:300] if lines else ""

    def get(self, session_id: str) -> Session | None:
        session = self.sessions.get(session_id)
        if session is not None and not session.alive:
            self._remove(session)
            return None
        return session

    def reap(self) -> list[str]:
        """Forget sessions whose process has ended and remove their folders; returns their ids."""
        ended = [s for s in self.sessions.values() if not s.alive]
        for session in ended:
            self._remove(session)
        return [s.id for s in ended]

    def end(self, session_id: str, timeout: float = 5.0) -> None:
        session = self.sessions.get(session_id)
        if session is None:
            return
        if session.alive:
            session.process.terminate()
            try:
                session.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(session.process.pid, 9) if hasattr(os, "killpg") else session.process.kill()
                session.process.wait()
        self._remove(session)

    def close(self) -> None:
        """End every session and remove the server's work folder."""
        for session_id in list(self.sessions):
            self.end(session_id)
        shutil.rmtree(self.root, ignore_errors=True)

    def _remove(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        shutil.rmtree(session.folder, ignore_errors=True)
        logger.info("session %s ended", session.id[:6])
