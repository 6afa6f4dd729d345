"""The console proxy on the management node's API server: the page (``/console/?vmInstanceUuid=
&token=``), its static files with the vendored noVNC client (``/console/static/``), and the
WebSocket the page connects to (``/console/ws``, same parameters).

The WebSocket is authenticated by its one-time token alone (compute/console.py): the token is
spent, or the socket closed with the reason, before anything is asked of the VM's host. Then the
node opens a tunnel to the host's agent over the agent wire (mutual TLS, the node's certificate)
and relays the RFB bytes both ways; the browser never learns where the VM runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from nimbostack.compute import console
from nimbostack.core.errors import CONSOLE_TOKEN_REFUSED, ApiError
from nimbostack.core.platform import Platform
from nimbostack.web import STATIC

log = logging.getLogger(__name__)

# the page runs only the node's own files, and talks only to the node: no inline script or style
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": POLICY,
    # the page's address holds the token: it is sent nowhere else, not even as a referrer
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
REFUSED = 1008  # WebSocket close code: policy violation
UNAVAILABLE = 1011  # the console cannot be reached
MAX_REASON = 123  # bytes a WebSocket close reason may hold


async def page(_request: Request) -> Response:
    return FileResponse(STATIC / "console.html", headers=HEADERS, media_type="text/html")


class StaticWithPolicy(StaticFiles):
    """The page's files under the same policy headers (a module script is fetched like any file)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items() if k != "Cache-Control"]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await super().__call__(scope, receive, with_headers)


def _reason(text: str) -> str:
    return text.encode()[:MAX_REASON].decode(errors="ignore")


async def _close(websocket: WebSocket, code: int, reason: str = "") -> None:
    if websocket.application_state == WebSocketState.CONNECTED and websocket.client_state == WebSocketState.CONNECTED:
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await websocket.close(code, _reason(reason))


async def _relay(websocket: WebSocket, tunnel: aiohttp.ClientWebSocketResponse) -> str:
    """Bytes both ways until either end closes; what ended it."""

    async def from_browser() -> str:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return "the browser closed"
            data = message.get("bytes")
            if data is not None:  # RFB is binary; a text frame carries nothing for it
                await tunnel.send_bytes(data)

    async def from_host() -> str:
        async for message in tunnel:
            if message.type != aiohttp.WSMsgType.BINARY:
                break
            await websocket.send_bytes(message.data)
        return "the VM's console closed"

    tasks = [asyncio.create_task(from_browser()), asyncio.create_task(from_host())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first = done.pop()
        return first.result() if not first.cancelled() and first.exception() is None else str(first.exception())
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await tunnel.close()


def socket_endpoint(platform: Callable[[], Platform]) -> Callable[[WebSocket], object]:
    async def console_socket(websocket: WebSocket) -> None:
        p = platform()
        vm_uuid = websocket.query_params.get("vmInstanceUuid", "")
        token = websocket.query_params.get("token", "")
        # noVNC may ask for the "binary" subprotocol; RFB over WebSocket needs no other
        offered = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol="binary" if "binary" in offered else None)
        try:
            await console.redeem(p, vm_uuid, token)
            host_uuid, url = await console.console_host(p, vm_uuid)
            tunnel = await p.agents.tunnel(url, "/vm/vnc", {"hostUuid": host_uuid, "vmUuid": vm_uuid})
        except ApiError as err:
            refused = err.code == CONSOLE_TOKEN_REFUSED
            log.info("console of VM %s %s: %s", vm_uuid, "refused" if refused else "unavailable", err.details)
            await _close(websocket, REFUSED if refused else UNAVAILABLE, err.details or err.description)
            return
        log.info("console of VM %s opened for %s", vm_uuid, websocket.client.host if websocket.client else "?")
        ended = await _relay(websocket, tunnel)
        log.info("console of VM %s closed: %s", vm_uuid, ended)
        await _close(websocket, 1000, ended)

    return console_socket


def routes(platform: Callable[[], Platform]) -> list[BaseRoute]:
    return [
        Route(console.PAGE_PATH, page, methods=["GET"]),
        WebSocketRoute(console.SOCKET_PATH, socket_endpoint(platform)),
        Mount("/console/static", StaticWithPolicy(directory=STATIC)),
    ]


@asynccontextmanager
async def serving(p: Platform) -> AsyncIterator[None]:
    """The proxy's row says Connected while this node serves the console routes."""
    await console.join(p)
    try:
        yield
    finally:
        try:
            await console.leave(p)
        except Exception as err:  # a node going down with its database still stops
            log.warning("could not mark the console proxy Disconnected: %s", err)
