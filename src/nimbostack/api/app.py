"""The management node's HTTP server."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from nimbostack.api import routes  # noqa: F401  (registers handlers)
from nimbostack.api.dispatch import Dispatcher, Route
from nimbostack.api.openapi import openapi_document
from nimbostack.compute import host as hostmod
from nimbostack.compute import recovery, vmsync
from nimbostack.core import expunger, gc
from nimbostack.core.errors import INVALID_ARGUMENT, ApiError
from nimbostack.core.platform import Platform, Settings
from nimbostack.network.l2l3 import seed_providers

log = logging.getLogger(__name__)

# A client polls GET /zstack/api/result/JOB until the job is Done. Holding a poll of a job that runs
# on this node until it ends (at most this long) answers at once when it ends, and spares a client
# many polls: under load each poll was a request as costly as the work the job itself did.
RESULT_WAIT = 1.0


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


def create_app(settings: Settings) -> FastAPI:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        p = await start_platform(settings)
        state["p"] = p
        state["dispatcher"] = Dispatcher(p, settings.quick_wait)
        loops = [hostmod.ping_loop(p), expunger.expunge_loop(p), gc.gc_loop(p)] if settings.background else []
        loops.append(p.config.refresh_loop())  # always: other nodes' config changes must arrive
        tasks = [asyncio.create_task(loop) for loop in loops]
        log.info("management node ready on port %s (database %s)", settings.port, settings.db_url.split("://")[0])
        yield
        for t in tasks:
            t.cancel()
        await p.close()

    app = FastAPI(title="nimbostack", version="0.1.0", lifespan=lifespan, docs_url="/docs", openapi_url=None)
    app.state.nimbo = state

    @app.post("/zstack/api")
    async def zstack_api(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except ValueError as err:
            return JSONResponse(
                {
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
            )
        return JSONResponse(await state["dispatcher"].handle(body))

    @app.get("/zstack/api/result/{job_uuid}")
    async def zstack_result(job_uuid: str) -> JSONResponse:
        # a poll of a job still running here is held until it ends or RESULT_WAIT passes
        found = await state["p"].jobs.result(job_uuid, wait=RESULT_WAIT if settings.quick_wait > 0 else 0)
        if found is None:
            return JSONResponse(
                {
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
                },
                status_code=404,
            )
        job_state, result, progress = found
        if job_state == "Processing":
            extra = {"progress": progress} if progress else {}
            return JSONResponse({"state": "Processing", "uuid": job_uuid, **extra})
        return JSONResponse({"state": "Done", "result": result})

    @app.post("/agent/events")
    async def agent_event(request: Request) -> JSONResponse:
        ev = await request.json()
        await vmsync.on_event(state["p"], ev["hostUuid"], ev["vmUuid"], ev["state"])
        return JSONResponse({"success": True})

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
