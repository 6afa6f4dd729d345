"""The management node's HTTP server."""

from __future__ import annotations

import asyncio
import gc as pygc
import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from nimbostack.api import routes  # noqa: F401  (registers handlers)
from nimbostack.api.dispatch import Dispatcher
from nimbostack.api.openapi import openapi_document
from nimbostack.compute import host as hostmod
from nimbostack.compute import recovery, vmsync
from nimbostack.core import expunger, gc
from nimbostack.core.context import Route
from nimbostack.core.errors import INTERNAL, INVALID_ARGUMENT, ApiError
from nimbostack.core.platform import Platform, Settings
from nimbostack.network.l2l3 import seed_providers

log = logging.getLogger(__name__)

# A client polls GET /zstack/api/result/JOB until the job is Done. Holding a poll of a job that runs
# on this node until it ends (at most this long) answers at once when it ends, and spares a client
# many polls: under load each poll was a request as costly as the work the job itself did.
RESULT_WAIT = 3.0


async def _no_handler(_ctx: Any) -> dict[str, Any]:
    return {}


# the session check of the read-only HTTP endpoints beside the API (GET /gc)
_ADMIN_READ = Route(_no_handler, admin=True)


async def start_platform(settings: Settings) -> Platform:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    p = Platform(settings)
    await p.db.migrate()
    await p.config.seed()
    await p.auth.seed_admin()
    await seed_providers(p.db)
    await recovery.recover(p)
    return p


class _WireFastPath:
    """The three requests every API call makes (POST /zstack/api, GET /zstack/api/result/JOB, and
    the agent's POST /agent/events), answered straight from ASGI with the same bytes the routes
    below would send. FastAPI's middleware, routing, request and response objects cost about as
    much CPU as the node's own handling of a result poll, and a busy node answers thousands a
    second. Any other request, or these with another method, goes through FastAPI as before. A
    failure here is answered in the wire's shape (an APIReply error), never a bare 500."""

    RESULT = "/zstack/api/result/"

    def __init__(
        self,
        app: ASGIApp,
        post: Callable[[bytes], Awaitable[dict[str, Any]]],
        result: Callable[[str], Awaitable[tuple[int, dict[str, Any]]]],
        event: Callable[[bytes], Awaitable[dict[str, Any]]],
    ) -> None:
        self.app, self.post, self.result, self.event = app, post, result, event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                if await self._fast(scope, receive, send):
                    return
            except ClientDisconnect:
                return
            except Exception as err:  # a bug, or an agent's malformed event: say so in the wire's shape
                log.exception("%s %s failed", scope["method"], scope["path"])
                error = {"code": INTERNAL, "description": "Internal error", "details": f"{type(err).__name__}: {err}"}
                reply = {"org.zstack.header.message.APIReply": {"success": False, "error": error}}
                return await self._answer(send, 200, {"state": "Done", "result": json.dumps(reply)})
        await self.app(scope, receive, send)

    async def _fast(self, scope: Scope, receive: Receive, send: Send) -> bool:
        method, path = scope["method"], scope["path"]
        if method == "POST" and path == "/zstack/api":
            await self._answer(send, 200, await self.post(await _body(receive)))
            return True
        if method == "GET" and path.startswith(self.RESULT) and "/" not in path[len(self.RESULT) :]:
            job_uuid = path[len(self.RESULT) :]
            if job_uuid:
                await self._answer(send, *(await self.result(job_uuid)))
                return True
        if method == "POST" and path == "/agent/events":
            await self._answer(send, 200, await self.event(await _body(receive)))
            return True
        return False

    @staticmethod
    async def _answer(send: Send, status: int, content: dict[str, Any]) -> None:
        # as starlette's JSONResponse renders it
        body = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()
        headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _NodeApp(FastAPI):
    """FastAPI, with the wire's hot requests taken before its middleware (``_WireFastPath``)."""

    fast_path: _WireFastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast_path is not None:
            await self.fast_path(scope, receive, send)
        else:
            await self.slow_path(scope, receive, send)

    async def slow_path(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def create_app(settings: Settings) -> FastAPI:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        p = await start_platform(settings)
        state["p"] = p
        state["dispatcher"] = Dispatcher(p, settings.quick_wait)
        loops = [hostmod.ping_loop(p), expunger.expunge_loop(p), gc.gc_loop(p)] if settings.background else []
        loops.append(p.config.refresh_loop())  # always: other nodes' config changes must arrive
        loops.append(p.db.checkpoint_loop())  # always: SQLite's log is written back only there
        tasks = [asyncio.create_task(loop) for loop in loops]
        # Everything alive now (modules, the API table, SQLAlchemy's mappers and caches) lives as
        # long as the node: keep it out of the collector's scans. And let the young generation
        # grow bigger before a collection: an API call makes thousands of short-lived ORM objects,
        # and the default threshold (700) ran a collection every few statements.
        pygc.collect()
        pygc.freeze()
        pygc.set_threshold(50_000, 20, 20)
        log.info("management node ready on port %s (database %s)", settings.port, settings.db_url.split("://")[0])
        yield
        for t in tasks:
            t.cancel()
        await p.close()

    app = _NodeApp(title="nimbostack", version="0.1.0", lifespan=lifespan, docs_url="/docs", openapi_url=None)
    app.state.nimbo = state

    async def api_post(raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw)
        except ValueError as err:
            return {
                "state": "Done",
                "result": json.dumps(
                    {
                        "org.zstack.header.message.APIReply": {
                            "success": False,
                            "error": {
                                "code": INVALID_ARGUMENT,
                                "description": "The body is not JSON",
                                "details": str(err),
                            },
                        }
                    }
                ),
            }
        return await state["dispatcher"].handle(body)

    async def api_result(job_uuid: str) -> tuple[int, dict[str, Any]]:
        # a poll of a job still running here is held until it ends or RESULT_WAIT passes
        found = await state["p"].jobs.result(job_uuid, wait=RESULT_WAIT if settings.quick_wait > 0 else 0)
        if found is None:
            return 404, {
                "state": "Done",
                "result": json.dumps(
                    {
                        "org.zstack.header.message.APIReply": {
                            "success": False,
                            "error": {
                                "code": "SYS.1006",
                                "description": "Unknown job",
                                "details": f"no API job {job_uuid}",
                            },
                        }
                    }
                ),
            }
        job_state, result, progress = found
        if job_state == "Processing":
            extra = {"progress": progress} if progress else {}
            return 200, {"state": "Processing", "uuid": job_uuid, **extra}
        return 200, {"state": "Done", "result": result}

    async def agent_event(raw: bytes) -> dict[str, Any]:
        ev = json.loads(raw)
        await vmsync.on_event(state["p"], ev["hostUuid"], ev["vmUuid"], ev["state"])
        return {"success": True}

    @app.post("/zstack/api")
    async def zstack_api(request: Request) -> JSONResponse:
        return JSONResponse(await api_post(await request.body()))

    @app.get("/zstack/api/result/{job_uuid}")
    async def zstack_result(job_uuid: str) -> JSONResponse:
        status, body = await api_result(job_uuid)
        return JSONResponse(body, status_code=status)

    @app.post("/agent/events")
    async def agent_events(request: Request) -> JSONResponse:
        return JSONResponse(await agent_event(await request.body()))

    app.fast_path = _WireFastPath(app.slow_path, post=api_post, result=api_result, event=agent_event)

    @app.get("/gc")
    async def garbage_collector(
        request: Request, status: str | None = None, hostUuid: str | None = None, resourceUuid: str | None = None
    ) -> JSONResponse:
        """The garbage collector's entries (release 1.2 §4), newest first; an admin session in
        ``Authorization: OAuth <session uuid>`` or ``?session=<uuid>``. Filters: status
        (Pending | Done), hostUuid, resourceUuid."""
        p = state["p"]
        auth = request.headers.get("authorization", "")
        session = auth.split(" ", 1)[1].strip() if auth.lower().startswith("oauth ") else None
        try:
            await p.auth.caller(session or request.query_params.get("session"), _ADMIN_READ)
        except ApiError as err:
            return JSONResponse({"success": False, "error": err.to_dict()}, status_code=403)
        inventories = await gc.entries(p, status, hostUuid, resourceUuid)
        return JSONResponse({"success": True, "inventories": inventories})

    @app.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(openapi_document())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        p = state["p"]
        return {"status": "ok", "jobsInFlight": p.jobs.in_flight(), "queued": p.queues.pending()}

    return app
