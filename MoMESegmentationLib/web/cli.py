"""``mome web``: the browser app. Importing this module imports neither trame nor Slicer."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import InputError, MoMEError
from . import INSTALL_HINT

#: Where the access key comes from when --access-key-file is not given.
KEY_VARIABLE = "MOME_WEB_KEY"


def missing_web_requirements() -> str | None:
    """``None`` when the web app can run here, else one line saying what is missing."""
    import importlib.util

    # Looked up, not imported: the library stays free of Slicer; the session process imports them.
    for module in ("aiohttp", "trame", "trame_slicer", "slicer_core"):
        if importlib.util.find_spec(module) is None:
            return f"mome web needs {module.replace('_', '-')}: {INSTALL_HINT}"
    if importlib.util.find_spec("slicer_layer_dm") is None:
        return f"mome web needs Slicer's layer displayable managers (slicer-layer-dm): {INSTALL_HINT}"
    return None


def _access_key(args: argparse.Namespace) -> str | None:
    if args.access_key_file:
        try:
            return Path(args.access_key_file).expanduser().read_text(encoding="utf-8").strip() or None
        except OSError as error:
            raise InputError(f"{args.access_key_file}: cannot read the access key "
                             f"({error.strerror or error})") from None
    return os.environ.get(KEY_VARIABLE) or None


def check_bind(host: str, key: str | None) -> None:
    """Only this computer may reach a server without an access key, and a key must be long enough."""
    from ..server import is_loopback

    key = key or None
    if key is not None and len(key) < 16:
        raise InputError("the access key is shorter than 16 characters; make one with: python -c "
                         '"import secrets; print(secrets.token_urlsafe(32))"')
    if not is_loopback(host) and not key:
        raise InputError(f"--host {host}: a web app reachable from other computers needs an access key; set "
                         f"{KEY_VARIABLE} or pass --access-key-file (or listen on 127.0.0.1 behind a "
                         "reverse proxy that checks who comes in, see docs/WEB.md)")


def run_web(args: argparse.Namespace) -> int:
    key = _access_key(args)
    check_bind(args.host, key)
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise InputError(f"--data-dir {args.data_dir}: folder not found")
    missing = missing_web_requirements()
    if missing:
        raise MoMEError(missing)
    from .front import run_front
    from .sessions import WebConfig

    config = WebConfig(
        host=args.host, port=args.port, access_key=key,
        data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None,
        model=args.model, device=args.device, threads=args.threads,
        max_upload_bytes=int(args.max_upload_mb * 1e6), max_voxels=int(args.max_voxels),
        max_sessions=args.max_sessions, session_timeout_s=int(args.session_timeout),
        work_dir=args.work_dir,
    )
    run_front(config)
    return 0


def register(sub) -> None:
    """Add ``mome web`` to the CLI's subcommands."""
    web = sub.add_parser(
        "web",
        help="MoME in the browser: Slicer's views and the segmentation panel in a web page (trame-slicer)",
        description="Serve the segmentation app to web browsers. Without an access key it listens on this "
        f"computer only; the key comes from ${KEY_VARIABLE} or --access-key-file. Each browser tab gets "
        f"its own session (scene, worker, temporary folder). Needs the 'web' extra: {INSTALL_HINT}.",
    )
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    web.add_argument("--port", type=int, default=8780, help="port (default 8780)")
    web.add_argument("--data-dir", default=None, help="server-side folder of scans offered in the page")
    web.add_argument("--model", default="demo", help="default model: registry name or checkpoint (default demo)")
    web.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    web.add_argument("--threads", type=int, default=None, help="CPU threads of each session's worker")
    web.add_argument("--access-key-file", default=None, help=f"file holding the access key (default ${KEY_VARIABLE})")
    web.add_argument("--max-upload-mb", type=float, default=1000.0, help="largest upload in MB (default 1000)")
    web.add_argument("--max-voxels", type=float, default=512 * 512 * 1500,
                     help="largest scan in voxels (default 512x512x1500)")
    web.add_argument("--max-sessions", type=int, default=4, help="browser sessions at once (default 4)")
    web.add_argument("--session-timeout", type=float, default=60.0,
                     help="seconds a session lives on after its last tab closed (default 60)")
    web.add_argument("--work-dir", default=None, help="parent of the session folders (default: temp folder)")
    web.set_defaults(handler=run_web)
