"""The agent's end of the console proxy: ``GET /vm/vnc?hostUuid=&vmUuid=`` upgrades to a WebSocket
over the agent wire (the management node's certificate only, checked by the server) and relays it
to the VM's VNC server on this host's loopback, which nothing else reaches.

The first message is text, the wire's usual answer: ``{"success": true}`` once the VNC server
answered, or ``{"success": false, "error": {...}}`` and the socket closes. Every later message is
binary, bytes of the RFB stream as they came."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSMsgType, web

from nimbostack.agent.driver import DriverError
from nimbostack.agent.host import Agent

log = logging.getLogger(__name__)

CHUNK = 64 << 10
# a framebuffer update of a large screen comes in a few of these; the browser's side sends little
MAX_MESSAGE = 4 << 20


async def vnc_tunnel(agent: Agent, request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=MAX_MESSAGE)
    await ws.prepare(request)
    vm_uuid = request.query.get("vmUuid", "")
    try:
        if not vm_uuid:
            raise DriverError("AGENT_BAD_COMMAND", "malformed agent command", "vmUuid is missing")
        reader, writer = await agent.driver(request.query.get("hostUuid", "")).open_vnc(vm_uuid)
    except DriverError as err:
        error = {"code": err.code, "description": err.description, "details": err.details}
        await ws.send_json({"success": False, "error": error})
        await ws.close()
        return ws
    await ws.send_json({"success": True})
    log.info("console of VM %s opened", vm_uuid)

    async def to_vnc() -> None:
        async for msg in ws:
            if msg.type != WSMsgType.BINARY:
                return
            writer.write(msg.data)
            await writer.drain()

    async def from_vnc() -> None:
        while chunk := await reader.read(CHUNK):
            await ws.send_bytes(chunk)

    tasks = [asyncio.create_task(to_vnc()), asyncio.create_task(from_vnc())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()
        await ws.close()
        log.info("console of VM %s closed", vm_uuid)
    return ws
