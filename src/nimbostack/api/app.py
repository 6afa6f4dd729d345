"""The management node's HTTP server: one Starlette route table over the node that node.py starts."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import BaseRoute, Route, Router
from starlette.types import Receive, Scope, Send, StatelessLifespan

from nimbostack import node
from nimbostack.api import agent_wire, console, routes, web  # noqa: F401  (routes registers handlers)
from nimbostack.api.dispatch import Dispatcher
from nimbostack.api.docs import docs_page
from nimbostack.api.openapi import openapi_document
from nimbostack.core import gc
from nimbostack.core.context import Route as ApiRoute
from nimbostack.core.envelope import error_result
from nimbostack.core.errors import INTERNAL, INVALID_ARGUMENT, RESOURCE_NOT_FOUND, ApiError, storage_full
from nimbostack.core.platform import Platform, Settings
from nimbostack.db.engine import StorageFull

log = logging.getLogger(__name__)

# A client polls GET /zstack/api/result/JOB until the job is Done. Holding a poll of a job that runs
# on this node until it ends (at most this long) answers at once when it ends, and spares a client
# many polls: under load each poll was a request as costly as the work the job itself did.
RESULT_WAIT = 3.0

Answer = Callable[[Scope, Receive], Awaitable[tuple[int, dict[str, Any]]]]


async def _no_handler(_ctx: Any) -> dict[str, Any]:
    return {}


# the session check of the read-only HTTP endpoints beside the API (GET /gc)
_ADMIN_READ = ApiRoute(_no_handler, admin=True)


def _failed(err: ApiError) -> dict[str, Any]:
    """The wire's answer to a request that reached no API message: an APIReply error, Done."""
    return {"state": "Done", "result": error_result(None, err)}


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_json(send: Send, status: int, content: dict[str, Any]) -> None:
    # the bytes and headers starlette's JSONResponse sends, without building one
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()
    headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class WireEndpoint:
    """One of the requests every API call makes, as a raw ASGI app in the route table (starlette's
    Route takes an object that is not a function as ASGI). Starlette's Request, JSONResponse and a
    function endpoint's wrapping cost about as much CPU as the node's own handling of a result
    poll, and a busy node answers thousands a second. A failure is answered in the wire's shape
    (an APIReply error), never a bare 500."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            status, content = await self.answer(scope, receive)
        except ClientDisconnect:
            return
        except StorageFull as err:  # no bug: the database said why (logged by the data layer)
            status, content = 200, _failed(storage_full(str(err)))
        except Exception as err:  # a bug, or an agent's malformed event: say so in the wire's shape
            log.exception("%s %s failed", scope["method"], scope["path"])
            status, content = 200, _failed(ApiError(INTERNAL, "Internal error", f"{type(err).__name__}: {err}"))
        await _send_json(send, status, content)


class Wire:
    """The routes' answers, from the platform and dispatcher that the lifespan hands over (``serve``)."""

    platform: Platform
    dispatcher: Dispatcher

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # a poll of a job still running here is held until it ends or RESULT_WAIT passes
        self.result_wait = RESULT_WAIT if settings.quick_wait > 0 else 0

    def serve(self, p: Platform) -> None:
        self.platform = p
        self.dispatcher = Dispatcher(p, self.settings.quick_wait)

    async def api_post(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any]]:
        try:
            body = json.loads(await _body(receive))
        except (ValueError, RecursionError) as err:  # a body nested past the parser's depth too
            return 200, _failed(ApiError(INVALID_ARGUMENT, "The body is not JSON", str(err)))
        named = scope.get("path_params", {}).get("api_name")
        # POST /zstack/api/<message>: the same body, at a path that names the message (the
        # OpenAPI document's operation of each message; logs and proxies see which API it is)
        if named is not None and not (isinstance(body, dict) and list(body) == [named]):
            details = f"the body must be {{{named!r}: {{fields...}}}}"
            return 200, _failed(ApiError(INVALID_ARGUMENT, "The body is not the message of the path", details))
        client = scope.get("client")
        return 200, await self.dispatcher.handle(body, client[0] if client else "")

    async def api_result(self, scope: Scope, _receive: Receive) -> tuple[int, dict[str, Any]]:
        job_uuid = scope["path_params"]["job_uuid"]
        found = await self.platform.jobs.result(job_uuid, wait=self.result_wait)
        if found is None:
            return 404, _failed(ApiError(RESOURCE_NOT_FOUND, "Unknown job", f"no API job {job_uuid}"))
        job_state, result, progress = found
        if job_state == "Processing":
            extra = {"progress": progress} if progress else {}
            return 200, {"state": "Processing", "uuid": job_uuid, **extra}
        return 200, {"state": "Done", "result": result}

    async def garbage_collector(self, request: Request) -> JSONResponse:
        """The garbage collector's entries (release 1.2 §4), newest first; an admin session in
        ``Authorization: OAuth <session uuid>`` or ``?session=<uuid>``. Filters: status
        (Pending | Done), hostUuid, resourceUuid."""
        auth = request.headers.get("authorization", "")
        query = request.query_params
        session = auth.split(" ", 1)[1].strip() if auth.lower().startswith("oauth ") else None
        try:
            await self.platform.auth.caller(session or query.get("session"), _ADMIN_READ)
        except ApiError as err:
            return JSONResponse({"success": False, "error": err.to_dict()}, status_code=403)
        filters = query.get("status"), query.get("hostUuid"), query.get("resourceUuid")
        inventories = await gc.entries(self.platform, *filters)
        return JSONResponse({"success": True, "inventories": inventories})

    async def health(self, _request: Request) -> JSONResponse:
        """``ok`` (200), or ``failing`` (503) with what is wrong with the database: a load balancer
        or monitor polls it, so it costs a trivial SELECT and a statvfs, nothing more."""
        p = self.platform
        problem = await p.db.check()
        body = {
            "status": "ok" if problem is None else "failing",
            "database": problem or "ok",
            "jobsInFlight": p.jobs.in_flight(),
            "queued": p.queues.pending(),
        }
        return JSONResponse(body, status_code=200 if problem is None else 503)


async def openapi(_request: Request) -> JSONResponse:
    return JSONResponse(openapi_document())


async def docs(_request: Request) -> HTMLResponse:
    return HTMLResponse(docs_page())


class NodeApp(Router):
    """The node's one route table, served as the ASGI app itself: a Starlette application around it
    would add two middlewares to every request, about as much CPU again as the router and a wire
    endpoint take. ``wire`` is what the routes answer from."""

    def __init__(self, wire: Wire, table: list[BaseRoute], lifespan: StatelessLifespan[Any]) -> None:
        super().__init__(table, lifespan=lifespan)
        self.wire = wire


def create_app(settings: Settings) -> NodeApp:
    wire = Wire(settings)

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        async with node.running(settings) as p, agent_wire.serving(p), console.serving(p):
            wire.serve(p)
            yield

    api_post = WireEndpoint(wire.api_post)
    table: list[BaseRoute] = [
        # the hot three first: the router tries the routes in this order
        Route("/zstack/api", api_post, methods=["POST"]),
        Route("/zstack/api/result/{job_uuid}", WireEndpoint(wire.api_result), methods=["GET"]),
        # ZStack's SDK posts here; a redirect to /zstack/api would lose the body with many clients
        Route("/zstack/api/", api_post, methods=["POST"]),
        Route("/zstack/api/{api_name}", api_post, methods=["POST"]),
        Route("/gc", wire.garbage_collector),
        Route("/health", wire.health),
        Route("/openapi.json", openapi),
        Route("/docs", docs),
        # the console proxy: its page, the page's files and the WebSocket to a VM's VNC
        *console.routes(lambda: wire.platform),
        # the web UI at / and its endpoints beside the API (api/web.py)
        *web.routes(lambda: wire.platform, lambda: wire.dispatcher),
    ]
    return NodeApp(wire, table, lifespan)
