"""Reaching a host's agent: its URL (from the host's row, or for a new host from its address and
tags) and a command to it under the current API's deadline."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import bindparam, select

from nimbostack.core.errors import ApiError, not_allowed
from nimbostack.core.tags import tag_value
from nimbostack.db import models as m

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform, Settings


def agent_port_of(tags: list[str], default: int) -> int:
    """``agentPort::N`` lets several agents share one machine (tests, or a host behind NAT)."""
    return int(tag_value(tags, "agentPort::") or default)


def agent_url(settings: Settings, hypervisor: str, management_ip: str, tags: list[str]) -> str:
    """Where the agent of a new host listens."""
    if hypervisor == "Simulator":
        return settings.simulator_agent_url
    return f"https://{management_ip}:{agent_port_of(tags, settings.agent_port)}"


# Built once: every agent command of every VM operation runs it, and building the statement and its
# cache key each time cost as much as a third of running it. The key is memoised on this object.
_AGENT_URL = select(m.Host.status, m.Host.agentUrl).where(m.Host.uuid == bindparam("host_uuid"))


async def agent_url_of(platform: Platform, host_uuid: str) -> str:
    """The agent URL of a Connected host. Two columns, not the whole row: every agent command of
    every VM operation asks."""
    async with platform.db.tx() as s:
        host = (await s.execute(_AGENT_URL, {"host_uuid": host_uuid})).first()
    if host is None:
        raise not_allowed(f"host {host_uuid} no longer exists")
    if host.status != "Connected":
        raise ApiError("HOST.1002", "The VM's host is not connected", f"host {host_uuid} is {host.status}")
    return str(host.agentUrl)


async def agent(
    platform: Platform, host_uuid: str, path: str, body: dict[str, Any], url: str | None = None
) -> dict[str, Any]:
    """A command to a host's agent. ``url``: the host's agent URL, when the caller read the host's
    row moments ago (the create flow, which placed the VM on a Connected host), so that it is not
    read again for every command."""
    url = url or await agent_url_of(platform, host_uuid)
    return await platform.agents.call(url, path, {"hostUuid": host_uuid, **body})


_CONNECTED_AMONG = (
    select(m.Host.uuid, m.Host.agentUrl)
    .where(m.Host.uuid.in_(bindparam("uuids", expanding=True)), m.Host.status == "Connected")
    .order_by(m.Host.uuid)
)
_CHUNK = 5000  # hosts per IN list: SQLite caps a statement's parameters


async def connected_among(platform: Platform, uuids: Iterable[str]) -> list[tuple[str, str]]:
    """(uuid, agent URL) of the Connected hosts among ``uuids``: what a change that concerns some
    hosts (those of an L3 network's VMs) sends its commands to."""
    wanted = sorted(set(uuids))
    out: list[tuple[str, str]] = []
    async with platform.db.tx() as s:
        for i in range(0, len(wanted), _CHUNK):
            rows = await s.execute(_CONNECTED_AMONG, {"uuids": wanted[i : i + _CHUNK]})
            out.extend((str(u), str(url)) for u, url in rows)
    return out


_OWN: list[str] = []  # this machine's addresses, read once


async def own_addresses(platform: Platform) -> list[str]:
    """The management node's own addresses (what a tenant's URL must not reach): those its API
    and agents use, its host name's, and every interface's (``ip -j addr``)."""
    if not _OWN:
        found = {urlsplit(platform.management_url).hostname or "", platform.settings.host}
        try:
            infos = await asyncio.to_thread(socket.getaddrinfo, socket.gethostname(), None)
            found.update(str(i[4][0]) for i in infos)
        except OSError:
            pass
        try:
            proc = await asyncio.create_subprocess_exec(
                "ip", "-j", "addr", "show", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
            )
            out, _ = await proc.communicate()
            for link in json.loads(out or b"[]"):
                found.update(str(a.get("local")) for a in link.get("addr_info", []) if a.get("local"))
        except (OSError, ValueError):
            pass
        _OWN.extend(sorted(a for a in found if a and a != "0.0.0.0"))
    return _OWN
