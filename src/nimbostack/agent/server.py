"""The host agent's HTTP server: the only way the management node reaches a host.

Every command is ``POST /<path>`` with a JSON body that names ``hostUuid``; every answer is
``{"success": true, ...}`` or ``{"success": false, "error": {code, description, details}}``.
A simulator agent serves many hosts (one SimulatorDriver each) over the same wire. The commands
are in ``commands.py``, ``guard.py`` (``/simulator/*``) and the plugins' agent parts (loaded by
``plugins.py``: the storage prefixes, ``/flat/*``), which register them in ``host.COMMANDS``."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from nimbostack.agent import commands, guard, plugins  # noqa: F401  (a command module registers its commands on import)
from nimbostack.agent.driver import DriverError
from nimbostack.agent.host import COMMANDS, Agent, norm_path
from nimbostack.wire import DEADLINE_HEADER

log = logging.getLogger(__name__)


def create_app(agent: Agent) -> FastAPI:
    plugins.load_all()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        yield
        await agent.close()

    app = FastAPI(title="nimbostack host agent", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.agent = agent

    @app.get("/bs/file")
    async def bs_file(root: str, path: str) -> Response:
        """Primary storages fetch images from here (the only GET of the wire)."""
        try:
            return FileResponse(agent.backup.file(root, path))
        except DriverError as err:
            return JSONResponse({"success": False, "error": {"code": err.code, "description": err.description,
                                                             "details": err.details}}, status_code=404)

    @app.get("/storage/file")
    async def storage_file(hostUuid: str, root: str, path: str) -> Response:  # noqa: N803
        """Another host's agent copies a volume's file from here (LocalStorageMigrateVolume)."""
        try:
            if norm_path(root) not in agent.roots:  # only files of this host's primary storages
                raise DriverError("STORAGE_ERROR", "not a primary storage of this host", root)
            return FileResponse(agent.store(hostUuid).file(agent.real(root), agent.real(path)))
        except DriverError as err:
            return JSONResponse({"success": False, "error": {"code": err.code, "description": err.description,
                                                             "details": err.details}}, status_code=404)

    @app.post("/{path:path}")
    async def dispatch(path: str, request: Request) -> JSONResponse:
        received = time.monotonic()
        fn = COMMANDS.get("/" + path)
        if fn is None:
            return JSONResponse(
                {
                    "success": False,
                    "error": {"code": "AGENT_UNKNOWN_COMMAND", "description": "unknown agent command", "details": path},
                }
            )
        try:
            body = await request.json()
            refused = await guard.before(agent, "/" + path, body, request.headers.get(DEADLINE_HEADER), received)
            if refused is not None:
                return refused
            result = await fn(agent, body)
            return JSONResponse({"success": True, **result})
        except DriverError as err:
            return JSONResponse(
                {"success": False, "error": {"code": err.code, "description": err.description, "details": err.details}}
            )
        except (KeyError, TypeError, ValueError) as err:
            return JSONResponse(
                {
                    "success": False,
                    "error": {
                        "code": "AGENT_BAD_COMMAND",
                        "description": "malformed agent command",
                        "details": repr(err),
                    },
                }
            )
        except Exception as err:
            log.exception("agent command %s failed", path)
            return JSONResponse(
                {
                    "success": False,
                    "error": {
                        "code": "AGENT_INTERNAL",
                        "description": "agent internal error",
                        "details": f"{type(err).__name__}: {err}",
                    },
                }
            )

    return app
