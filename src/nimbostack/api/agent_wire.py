"""The management node's side of the agent wire that agents open: ``POST /agent/events``, over
mutual TLS on its own port (``Settings.wire_port``), apart from the API that users reach.

An event is taken only from the agent of the host it names: the caller's certificate (wire/pki.py)
carries that agent's address, which must be the host's agent URL. What the event says is then
checked against the VM (compute/vmsync.on_event). aiohttp's server because the handler must see
the caller's certificate, which no ASGI server here passes on."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from aiohttp import web
from sqlalchemy import bindparam, select

from nimbostack.compute import vmsync
from nimbostack.db import models as m
from nimbostack.wire.pki import AGENT, agent_name, peer_of

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

_HOST_AGENT = select(m.Host.agentUrl).where(m.Host.uuid == bindparam("host"))
# (agent, host) pairs found to match, until when: every VM start brings an event, and a host's agent
# URL does not change while it exists; a deleted host's VMs are gone with it
_MATCH_SECONDS = 30.0
_MATCH_LIMIT = 100_000


def _answer(status: int, code: str = "", details: str = "") -> web.Response:
    body: dict[str, Any] = {"success": not code}
    if code:
        body["error"] = {"code": code, "description": "event refused", "details": details}
    return web.json_response(body, status=status, dumps=json.dumps)


def wire_app(p: Platform) -> web.Application:
    matched: dict[tuple[str, str], float] = {}

    async def serves(agent: str, host: str) -> bool:
        now = time.monotonic()
        if matched.get((agent, host), 0.0) > now:
            return True
        async with p.db.tx() as s:
            url = (await s.execute(_HOST_AGENT, {"host": host})).scalar()
        if url is None or agent_name(url) != agent:
            return False
        if len(matched) >= _MATCH_LIMIT:
            matched.clear()
        matched[(agent, host)] = now + _MATCH_SECONDS
        return True

    async def event(request: web.Request) -> web.Response:
        transport = request.transport
        peer = peer_of(transport.get_extra_info("peercert")) if transport is not None else None
        if peer is None:
            return _answer(401, "AGENT_UNAUTHENTICATED", "a certificate of the management node's CA is required")
        if peer.role != AGENT:
            return _answer(403, "AGENT_FORBIDDEN", "only a host agent posts events")
        try:
            ev = json.loads(await request.read())
            host, vm, state = str(ev["hostUuid"]), str(ev["vmUuid"]), str(ev["state"])
        except (ValueError, KeyError, TypeError) as err:
            return _answer(400, "AGENT_BAD_EVENT", repr(err))
        if not await serves(peer.name, host):
            log.warning("refused an event about host %s from agent %s", host, peer.name)
            return _answer(403, "AGENT_FORBIDDEN", f"agent {peer.name} does not serve host {host}")
        await vmsync.on_event(p, host, vm, state)
        return _answer(200)

    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/agent/events", event)
    return app


@asynccontextmanager
async def serving(p: Platform) -> AsyncIterator[None]:
    runner = web.AppRunner(wire_app(p), access_log=None, keepalive_timeout=60, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, p.settings.host, p.settings.wire_port, ssl_context=p.credentials.server_context())
    await site.start()
    try:
        yield
    finally:
        await runner.cleanup()
