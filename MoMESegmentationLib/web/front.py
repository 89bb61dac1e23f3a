"""The HTTP front of ``mome web`` (aiohttp): access key, one session per visit, a proxy to each session.

Routes::

    GET  /                 a new session (its process is started), then a redirect to /s/<id>/
    ANY  /s/<id>/<path>    passed to the session's process: its page, websocket, upload and downloads
    GET  /health           {"status": "ok", "sessions": N} (no key needed)

With an access key every other route needs it: once as ``?key=KEY`` (it is then kept in an HttpOnly,
SameSite=Strict cookie) or as ``Authorization: Bearer KEY``. Session ids and the session processes'
own secrets are random, so a session is reachable only by the browser that made it (and by whoever
it shares the address with).
"""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
from typing import Any

from aiohttp import ClientSession, ClientTimeout, WSMsgType, web

from ..errors import MoMEError
from .sessions import SESSION_HEADER, SessionLimitError, SessionManager, WebConfig

__all__ = ["create_front", "run_front"]

logger = logging.getLogger(__name__)

KEY_COOKIE = "mome_web_key"
#: Headers that belong to one hop, not to the proxied request or answer.
_HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
                "transfer-encoding", "upgrade", "host", "content-length"}
_MANAGER = web.AppKey("manager", SessionManager)
_CLIENT = web.AppKey("client", ClientSession)


def _page(status: int, title: str, message: str) -> web.Response:
    body = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<body style='font-family: sans-serif; margin: 3em'><h2>{html.escape(title)}</h2>"
            f"<p id='mome-message'>{html.escape(message)}</p></body>")
    return web.Response(status=status, text=body, content_type="text/html")


def _has_key(request: web.Request, key: str | None) -> bool:
    if key is None:
        return True
    given = request.cookies.get(KEY_COOKIE) or ""
    authorization = request.headers.get("Authorization", "")
    if authorization.startswith("Bearer "):
        given = authorization[7:].strip()
    return hmac.compare_digest(given.encode("utf-8"), key.encode("utf-8"))


def create_front(config: WebConfig, manager: SessionManager | None = None) -> web.Application:
    """The aiohttp application of ``mome web``; ``manager`` defaults to a new :class:`SessionManager`."""
    app = web.Application()
    app[_MANAGER] = manager or SessionManager(config)
    key = config.access_key

    async def on_startup(app: web.Application) -> None:
        app[_CLIENT] = ClientSession(auto_decompress=False, timeout=ClientTimeout(total=None, sock_connect=10))

        async def reap_forever() -> None:
            while True:
                await asyncio.sleep(1.0)
                app[_MANAGER].reap()

        app["reaper"] = asyncio.create_task(reap_forever())

    async def on_cleanup(app: web.Application) -> None:
        app["reaper"].cancel()
        await app[_CLIENT].close()
        app[_MANAGER].close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)

    async def health(request: web.Request) -> web.Response:
        manager = request.app[_MANAGER]
        manager.reap()
        return web.json_response({"status": "ok", "sessions": len(manager.sessions)})

    async def new_session(request: web.Request) -> web.StreamResponse:
        given = request.query.get("key")
        if key is not None and given is not None:
            if not hmac.compare_digest(given.encode("utf-8"), key.encode("utf-8")):
                return _page(401, "Wrong access key", "The access key in the address is not this server's.")
        elif not _has_key(request, key):
            return _page(401, "Access key needed", "Open this server's address with ?key=ACCESS_KEY "
                         "(ask whoever started it).")
        manager = request.app[_MANAGER]
        try:
            session = manager.create()
            while not manager.poll_ready(session):
                await asyncio.sleep(0.1)
        except SessionLimitError as error:
            return _page(503, "Server busy", str(error))
        except MoMEError as error:
            logger.error("%s", error)
            return _page(500, "The session did not start", str(error))
        response = web.HTTPSeeOther(f"s/{session.id}/?secret={session.secret}")
        if key is not None and given is not None:
            response.set_cookie(KEY_COOKIE, given, httponly=True, samesite="Strict",
                                secure=request.secure, path="/")
        return response

    async def proxy(request: web.Request) -> web.StreamResponse:
        if not _has_key(request, key):
            return _page(401, "Access key needed", "Open this server's address with ?key=ACCESS_KEY.")
        session = request.app[_MANAGER].get(request.match_info["session"])
        if session is None or session.port is None:
            return _page(404, "Session ended", "This session has ended (its tab was closed for a while). "
                         "Open the server's address again for a new one.")
        tail = request.match_info["tail"]
        target = f"http://127.0.0.1:{session.port}/{tail}"
        if request.query_string:
            target += "?" + request.query_string
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await _proxy_websocket(request, target)
        return await _proxy_http(request, target, session.secret)

    app.router.add_get("/health", health)
    app.router.add_get("/", new_session)
    app.router.add_route("*", "/s/{session}/{tail:.*}", proxy)
    app.router.add_get("/s/{session}", lambda r: web.HTTPFound(f"{r.match_info['session']}/"))
    return app


async def _proxy_http(request: web.Request, target: str, secret: str) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items()
               if k.lower() not in _HOP_HEADERS and k.lower() != SESSION_HEADER.lower()}
    headers[SESSION_HEADER] = secret  # the session's own routes (upload, download) check it
    client: ClientSession = request.app[_CLIENT]
    data: Any = request.content if request.body_exists else None
    async with client.request(request.method, target, headers=headers, data=data,
                              allow_redirects=False) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in _HOP_HEADERS:
                response.headers.add(name, value)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(1 << 16):
            await response.write(chunk)
        await response.write_eof()
        return response


async def _proxy_websocket(request: web.Request, target: str) -> web.StreamResponse:
    browser = web.WebSocketResponse(max_msg_size=0, autoping=True)
    await browser.prepare(request)
    client: ClientSession = request.app[_CLIENT]
    async with client.ws_connect(target.replace("http://", "ws://", 1), max_msg_size=0,
                                 autoping=True) as upstream:

        async def pipe(source, sink) -> None:
            async for message in source:
                if message.type == WSMsgType.TEXT:
                    await sink.send_str(message.data)
                elif message.type == WSMsgType.BINARY:
                    await sink.send_bytes(message.data)
                elif message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
            await sink.close()

        tasks = [asyncio.create_task(pipe(browser, upstream)), asyncio.create_task(pipe(upstream, browser))]
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
    if not browser.closed:
        await browser.close()
    return browser


def run_front(config: WebConfig, print_address: bool = True) -> None:
    """Serve until interrupted; every session is ended on the way out."""
    app = create_front(config)
    if print_address:
        shown = f"[{config.host}]" if ":" in config.host else config.host
        address = f"http://{shown}:{config.port}/"
        how = "access key required (open with ?key=...)" if config.access_key else "this computer only"
        print(f"mome web: open {address} ({how}); model {config.model}; Ctrl+C stops", flush=True)
    web.run_app(app, host=config.host, port=config.port, print=None, handle_signals=True,
                shutdown_timeout=5.0)
