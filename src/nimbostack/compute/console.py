"""The console proxy's management side: RequestConsoleAccess grants a one-time token for one VM's
VNC, QueryConsoleProxyAgent and ReconnectConsoleProxyAgent show and re-check the proxy.

The proxy itself is the management node's ``/console/ws`` route (api/console.py): the browser
reaches the node only, with the token; the node tunnels to the VM's host agent over the agent
wire's mutual TLS, and the agent to the VNC server on the host's loopback. So neither the host's
address nor its VNC port is ever handed out, and a token is worth one connection to one VM within
``console/token.timeout`` seconds. Only a hash of each token is stored, and its use is a single
conditional UPDATE, so that two management nodes on one database cannot both accept it."""

from __future__ import annotations

import hashlib
import secrets
import uuid as uuidlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from sqlalchemy import delete, select, update

from nimbostack.compute.vm import need_state, vm_for
from nimbostack.core import query
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import CONSOLE_NEEDS_VNC, CONSOLE_TOKEN_REFUSED, ApiError, not_allowed, not_found
from nimbostack.core.hosts import agent, agent_url_of
from nimbostack.core.management import HEARTBEAT_DEAD_AFTER
from nimbostack.core.resources import register_queries
from nimbostack.db import models as m
from nimbostack.db.engine import rowcount

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

PROXY_TYPE = "ManagementServerConsoleProxy"
# where the browser opens a VM's console, on the management node's API address
PAGE_PATH = "/console/"
SOCKET_PATH = "/console/ws"
# used and expired tokens are kept this long (what a refusal says about them), then deleted
KEEP_SPENT = timedelta(hours=1)

query.register(
    query.QueryTarget("QueryObjectConsoleProxyAgentInventory", m.ConsoleProxyAgent, scope="admin")
)
register_queries("QueryConsoleProxyAgent")


@dataclass(frozen=True)
class ProxyAddress:
    """Where browsers reach this node's console proxy: the management node's API address."""

    scheme: str  # http | https
    hostname: str
    port: int

    @property
    def base(self) -> str:
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return f"{self.scheme}://{host}:{self.port}"


def proxy_address(p: Platform) -> ProxyAddress:
    url = urlsplit(p.management_url)
    scheme = url.scheme or "http"
    return ProxyAddress(scheme, url.hostname or p.settings.host, url.port or (443 if scheme == "https" else 80))


def agent_uuid(p: Platform) -> str:
    """This node's proxy row: the same across the node's restarts, one per proxy address."""
    address = proxy_address(p)
    return uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"nimbostack-console-proxy:{address.base}").hex


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> datetime:
    # the database's DateTime columns are naive UTC, as everywhere in the schema
    return datetime.now(UTC).replace(tzinfo=None)


async def join(p: Platform) -> None:
    """This node's proxy row, Connected while the node serves the console route."""
    address = proxy_address(p)
    async with p.db.tx() as s:
        row = await s.get(m.ConsoleProxyAgent, agent_uuid(p))
        if row is None:
            row = m.ConsoleProxyAgent(uuid=agent_uuid(p), type=PROXY_TYPE, state="Enabled")
            s.add(row)
        row.managementIp = address.hostname
        row.description = f"the console proxy of the management node at {address.base} ({SOCKET_PATH})"
        row.status = "Connected"


async def leave(p: Platform) -> None:
    async with p.db.tx() as s:
        await s.execute(
            update(m.ConsoleProxyAgent).where(m.ConsoleProxyAgent.uuid == agent_uuid(p)).values(status="Disconnected")
        )


async def _agent_inventories(p: Platform, uuids: list[str]) -> list[dict[str, Any]]:
    async with p.db.tx() as s:
        rows = (
            await s.execute(select(m.ConsoleProxyAgent).where(m.ConsoleProxyAgent.uuid.in_(uuids)))
        ).scalars().all()
        return await query.inventories(s, query.TARGETS["QueryObjectConsoleProxyAgentInventory"], rows)


@api("ReconnectConsoleProxyAgent", admin=True)
async def reconnect_agents(ctx: ApiContext) -> dict[str, Any]:
    """Re-check the proxies named (all when none is): this node's serves as long as its agent-wire
    certificate is valid (every tunnel is made with it); another node's as long as that node still
    beats."""
    p = ctx.p
    await join(p)
    wanted = [str(u) for u in ctx.list("agentUuids")]
    now = _now()
    async with p.db.tx() as s:
        rows = list((await s.execute(select(m.ConsoleProxyAgent))).scalars())
        known = {r.uuid for r in rows}
        missing = [u for u in wanted if u not in known]
        if missing:
            raise not_found("ConsoleProxyAgent", missing[0])
        beating = set(
            (
                await s.execute(
                    select(m.ManagementNode.hostName).where(m.ManagementNode.heartBeat >= now - HEARTBEAT_DEAD_AFTER)
                )
            ).scalars()
        )
        for row in rows:
            if wanted and row.uuid not in wanted:
                continue
            if row.uuid == agent_uuid(p):
                valid = p.credentials.not_after.replace(tzinfo=None) > now
                row.status = "Connected" if valid else "Disconnected"
            else:
                row.status = "Connected" if row.managementIp in beating else "Disconnected"
    return {"inventories": await _agent_inventories(p, wanted or sorted(known))}


@api("RequestConsoleAccess")
async def request_console_access(ctx: ApiContext) -> dict[str, Any]:
    """A one-time console URL for a running VM's VNC, on the management node."""
    p = ctx.p
    vm = await vm_for(ctx, ctx.req("vmInstanceUuid"))
    need_state(vm, "Running", "Paused")
    if vm.hostUuid is None:
        raise not_allowed(f"VM {vm.uuid} is on no host")
    # the protocol of the domain as it runs: kvm vm.consoleMode applies to VMs started after a change
    console = await agent(p, vm.hostUuid, "/vm/console", {"vmUuid": vm.uuid})
    if console["protocol"] != "vnc":
        raise ApiError(
            CONSOLE_NEEDS_VNC,
            "The browser console needs a VNC console",
            f"VM {vm.uuid} runs with a {console['protocol']} console; the browser console needs "
            "kvm vm.consoleMode=vnc (UpdateGlobalConfig category=kvm name=vm.consoleMode value=vnc, then "
            "stop and start the VM); a spice client connects to the address GetVmConsoleAddress gives",
        )
    await join(p)
    token = secrets.token_urlsafe(32)
    now = _now()
    expires = now + timedelta(seconds=await p.config.get("console", "token.timeout"))
    async with p.db.tx() as s:
        await s.execute(delete(m.ConsoleProxy).where(m.ConsoleProxy.expireDate < now - KEEP_SPENT))
        s.add(
            m.ConsoleProxy(
                uuid=uuidlib.uuid4().hex,
                vmInstanceUuid=vm.uuid,
                tokenHash=_digest(token),
                agentUuid=agent_uuid(p),
                status="Active",
                expireDate=expires,
            )
        )
    address = proxy_address(p)
    wanted = urlencode({"vmInstanceUuid": vm.uuid, "token": token})
    return {
        "inventory": {
            # ZStack's ConsoleInventory: the proxy's address (never the host's) and the token
            "scheme": "vnc",
            "hostname": address.hostname,
            "port": address.port,
            "token": token,
            "vmInstanceUuid": vm.uuid,
            "expireDate": query.fmt_date(expires),
            # the page to open, and the WebSocket it connects to
            "url": f"{address.base}{PAGE_PATH}?{wanted}",
            "webSocketUrl": f"{'wss' if address.scheme == 'https' else 'ws'}://"
            f"{address.base.split('://', 1)[1]}{SOCKET_PATH}?{wanted}",
        }
    }


async def redeem(p: Platform, vm_uuid: str, token: str) -> None:
    """Spend ``token`` on the console of ``vm_uuid``, or raise why it is refused: it opens that
    VM's console once, before it expires."""
    digest = _digest(token)
    now = _now()
    async with p.db.tx() as s:
        spent = await s.execute(
            update(m.ConsoleProxy)
            .where(
                m.ConsoleProxy.tokenHash == digest,
                m.ConsoleProxy.vmInstanceUuid == vm_uuid,
                m.ConsoleProxy.status == "Active",
                m.ConsoleProxy.expireDate > now,
            )
            .values(status="Used")
        )
        if rowcount(spent) == 1:
            return
        row = (await s.execute(select(m.ConsoleProxy).where(m.ConsoleProxy.tokenHash == digest))).scalar_one_or_none()
    if row is None:
        why = "the console token is unknown"
    elif row.vmInstanceUuid != vm_uuid:
        why = "the console token is for another VM"
    elif row.status != "Active":
        why = "the console token was already used: ask RequestConsoleAccess for a new one"
    else:
        why = "the console token expired: ask RequestConsoleAccess for a new one"
    raise ApiError(CONSOLE_TOKEN_REFUSED, "The console access is refused", why)


async def console_host(p: Platform, vm_uuid: str) -> tuple[str, str]:
    """(host uuid, agent URL) of the host a VM's console is on now (it may have migrated since the
    token was granted)."""
    async with p.db.tx() as s:
        vm = await s.get(m.VmInstance, vm_uuid)
    if vm is None:
        raise not_found("VmInstance", vm_uuid)
    need_state(vm, "Running", "Paused")
    if vm.hostUuid is None:
        raise not_allowed(f"VM {vm.uuid} is on no host")
    return vm.hostUuid, await agent_url_of(p, vm.hostUuid)
