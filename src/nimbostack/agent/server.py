"""The host agent's HTTPS server: the only way the management node reaches a host.

Mutual TLS under the management node's CA (wire/pki.py): a caller without a certificate of that
CA gets no connection at all; a caller with one gets 403 unless its role may do what it asks —
commands (``POST /<path>``) and the console tunnel (``GET /vm/vnc``) are the management node's
alone, the two file reads (``GET /bs/file``, ``GET /storage/file``) also other hosts' agents', and
only below the storage roots the management node named here. aiohttp's server rather than an
ASGI one because the handler must know the peer's certificate
(``transport.get_extra_info("peercert")``), which no ASGI server here passes on.

Every command's body names ``hostUuid``; every answer is ``{"success": true, ...}`` or
``{"success": false, "error": {code, description, details}}``. A simulator agent serves many hosts
(one SimulatorDriver each) over the same wire. The commands are in ``commands.py``, ``guard.py``
(``/simulator/*``) and the plugins' agent parts (loaded by ``plugins.py``), which register them in
``host.COMMANDS``."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from nimbostack.agent import commands, guard, plugins  # noqa: F401  (a command module registers its commands on import)
from nimbostack.agent.console import vnc_tunnel
from nimbostack.agent.driver import DriverError
from nimbostack.agent.host import COMMANDS, Agent, norm_path
from nimbostack.wire import DEADLINE_HEADER
from nimbostack.wire.pki import AGENT, NODE, Peer, peer_of

log = logging.getLogger(__name__)


def _error(code: str, description: str, details: str = "", status: int = 200) -> web.Response:
    body = {"success": False, "error": {"code": code, "description": description, "details": details}}
    return web.json_response(body, status=status, dumps=json.dumps)


def _peer(request: web.Request) -> Peer | None:
    transport = request.transport
    return peer_of(transport.get_extra_info("peercert")) if transport is not None else None


def _refuse(request: web.Request, roles: tuple[str, ...]) -> web.Response | None:
    peer = _peer(request)
    if peer is not None and peer.role in roles:
        return None
    if peer is None:
        log.warning("refused %s %s from a caller without a certificate", request.method, request.path)
        return _error("AGENT_UNAUTHENTICATED", "a certificate of the management node's CA is required",
                      "this agent serves only callers with one (README: Credentials)", status=401)
    who = f"{peer.role} {peer.name}"
    log.warning("refused %s %s from %s", request.method, request.path, who)
    return _error("AGENT_FORBIDDEN", "this caller may not do that on this agent", who, status=403)


def _below(roots: set[str], path: str, real: Any) -> Path | None:
    """The file ``path`` names, when it resolves (symlinks and ``..`` followed) inside one of
    ``roots``; None otherwise."""
    target = Path(os.path.realpath(real(norm_path(path))))
    for root in roots:
        base = Path(os.path.realpath(real(root)))
        if target.is_relative_to(base) and target != base:
            return target
    return None


def create_app(agent: Agent) -> web.Application:
    plugins.load_all()
    app = web.Application(client_max_size=64 << 20)

    async def bs_file(request: web.Request) -> web.StreamResponse:
        """Primary storages fetch images from here: only files below a backup storage's url."""
        if (refused := _refuse(request, (NODE, AGENT))) is not None:
            return refused
        path = _below(agent.bs_roots, request.query.get("path", ""), lambda p: p)
        if path is None or not path.is_file():
            return _error("IMAGE_NOT_FOUND", "no such image file on this backup storage",
                          request.query.get("path", ""), status=404)
        return web.FileResponse(path)

    async def storage_file(request: web.Request) -> web.StreamResponse:
        """Another host's agent copies a volume's file from here (LocalStorageMigrateVolume)."""
        if (refused := _refuse(request, (NODE, AGENT))) is not None:
            return refused
        path = _below(agent.roots, request.query.get("path", ""), agent.real)
        if path is None or not path.is_file():
            return _error("VOLUME_NOT_FOUND", "no such file on this host's primary storages",
                          request.query.get("path", ""), status=404)
        return web.FileResponse(path)

    async def vnc(request: web.Request) -> web.StreamResponse:
        """The console proxy's tunnel to a VM's VNC (agent/console.py): the management node's alone."""
        if (refused := _refuse(request, (NODE,))) is not None:
            return refused
        return await vnc_tunnel(agent, request)

    async def dispatch(request: web.Request) -> web.Response:
        received = time.monotonic()
        if (refused := _refuse(request, (NODE,))) is not None:
            return refused
        path = "/" + request.match_info["path"]
        fn = COMMANDS.get(path)
        if fn is None:
            return _error("AGENT_UNKNOWN_COMMAND", "unknown agent command", path)
        try:
            body = json.loads(await request.read())
            if not isinstance(body, dict):
                raise TypeError("the command is not a JSON object")
            refused = await guard.before(agent, path, body, request.headers.get(DEADLINE_HEADER), received)
            if refused is not None:
                return refused
            result = await fn(agent, body)
            return web.json_response({"success": True, **result}, dumps=json.dumps)
        except DriverError as err:
            return _error(err.code, err.description, err.details)
        except (KeyError, TypeError, ValueError) as err:
            return _error("AGENT_BAD_COMMAND", "malformed agent command", repr(err))
        except Exception as err:
            log.exception("agent command %s failed", path)
            return _error("AGENT_INTERNAL", "agent internal error", f"{type(err).__name__}: {err}")

    async def close(_app: web.Application) -> None:
        await agent.close()

    app.router.add_get("/bs/file", bs_file)
    app.router.add_get("/storage/file", storage_file)
    app.router.add_get("/vm/vnc", vnc)
    app.router.add_post("/{path:.+}", dispatch)
    app.on_cleanup.append(close)
    return app


class AgentServer:
    """The agent's app served over mutual TLS on ``host:port`` until ``stop``."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.app = create_app(agent)
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        # keep-alive far longer than any client keeps an idle connection (the node's: 2 s), so a
        # command is never sent on a connection the agent is closing at that very moment
        self._runner = web.AppRunner(self.app, access_log=None, keepalive_timeout=60, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self.agent.credentials.server_context())
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
