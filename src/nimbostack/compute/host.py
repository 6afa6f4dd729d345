"""Hosts: adding (KVM or simulator), connecting through the agent, pings, capacity, state sync."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import bindparam, func, select, update

from nimbostack.compute import deploy
from nimbostack.compute.allocator import HOLDS_CAPACITY, recompute_capacity
from nimbostack.compute.vmsync import apply_host_states
from nimbostack.core import gc, hooks, query
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import AGENT_ERROR, ApiError, invalid, not_allowed
from nimbostack.core.hosts import agent_url
from nimbostack.core.resources import (
    Scope,
    add_creation_tags,
    capacity_sums,
    disown,
    inv,
    load,
    new_uuid,
    register_queries,
    state_event,
    update_fields,
)
from nimbostack.core.tags import system_tags
from nimbostack.db import models as m
from nimbostack.storage import primary
from nimbostack.wire import pki

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

query.register(
    query.QueryTarget(
        "QueryObjectHostInventory",
        m.Host,
        "HostInventory",
        scope="admin",
        joins={
            "zone": query.Join("zoneUuid", "QueryObjectZoneInventory", "uuid"),
            "cluster": query.Join("clusterUuid", "QueryObjectClusterInventory", "uuid"),
            "vmInstance": query.Join("uuid", "QueryObjectVmInstanceInventory", "hostUuid"),
        },
    )
)
register_queries("QueryHost")

# the hypervisor types hosts can be added as, each by its Add<Type>Host API (GetHypervisorTypes)
HYPERVISOR_TYPES: list[str] = []


def hypervisor_type(name: str) -> str:
    if name not in HYPERVISOR_TYPES:
        HYPERVISOR_TYPES.append(name)
    return name


KVM = hypervisor_type("KVM")
SIMULATOR = hypervisor_type("Simulator")


# what a connect reads of the host: columns, not the whole row (a restart connects every host)
_TO_CONNECT = select(
    m.Host.hypervisorType, m.Host.simCpuCapacity, m.Host.simMemoryCapacity, m.Host.agentUrl
).where(m.Host.uuid == bindparam("host"))


async def connect(platform: Platform, host_uuid: str, rotate: bool = False) -> None:
    """Connect the host's agent, read its capacity, reconcile its VMs; Connected on success.
    ``rotate``: first give the agent new credentials (``rotate_credentials``)."""
    async with platform.db.tx() as s:
        host = (await s.execute(_TO_CONNECT, {"host": host_uuid})).one()
        await s.execute(update(m.Host).where(m.Host.uuid == host_uuid).values(status="Connecting"))
    body: dict[str, Any] = {"hostUuid": host_uuid, "managementUrl": platform.agent_wire_url}
    if host.hypervisorType == SIMULATOR:
        body["simulator"] = {"cpuCapacity": host.simCpuCapacity, "memoryCapacity": host.simMemoryCapacity}
    url = str(host.agentUrl)
    try:
        if rotate:
            await rotate_credentials(platform, host_uuid, url)
        reply = await platform.agents.call(url, "/host/connect", body)
    except ApiError:
        async with platform.db.tx() as s:
            await s.execute(update(m.Host).where(m.Host.uuid == host_uuid).values(status="Disconnected"))
        raise
    facts = reply["facts"]
    if host.hypervisorType == SIMULATOR:
        figures = {"totalCpuCapacity": int(host.simCpuCapacity or 0),
                   "totalMemoryCapacity": int(host.simMemoryCapacity or 0)}
    else:
        reserved = await platform.config.get("kvm", "reservedMemory")
        figures = {"cpuNum": facts["cpu_num"], "cpuSpeed": facts["cpu_speed_mhz"],
                   "totalCpuCapacity": facts["cpu_num"] * facts["cpu_speed_mhz"],
                   "totalMemoryCapacity": max(0, facts["total_memory"] - reserved)}
    async with platform.db.tx() as s:
        # cpuModel: live migration compares it (kvm vm.cpuMode)
        await s.execute(update(m.Host).where(m.Host.uuid == host_uuid).values(
            **figures, cpuModel=facts.get("cpu_model") or None, status="Connected"))
    await reconcile_vms(platform, host_uuid, url)
    await recompute_capacity(platform, host_uuid)
    await hooks.host_connected(platform, host_uuid)


async def reconcile_vms(platform: Platform, host_uuid: str, url: str) -> None:
    """Make the database agree with what the hypervisor runs (after a restart on either side)."""
    reply = await platform.agents.call(url, "/vm/states", {"hostUuid": host_uuid}, timeout=30)
    await apply_host_states(platform, host_uuid, reply["states"])


async def _add_host(ctx: ApiContext, hypervisor: str, extra: dict[str, Any],
                    login: deploy.Login | None = None) -> dict[str, Any]:
    uuid = new_uuid(ctx)
    async with ctx.p.db.tx() as s:
        cluster = await load(s, m.Cluster, ctx.req("clusterUuid"), ctx, "Cluster")
        if cluster.hypervisorType != hypervisor:
            raise invalid(
                f"cluster {cluster.uuid} is a {cluster.hypervisorType} cluster; a {hypervisor} host cannot join it"
            )
        ip = ctx.req("managementIp")
        # simulated hosts share one agent and may share addresses: asked only for the others, as
        # the question reads every host (managementIp has no index)
        if hypervisor != SIMULATOR and not any(t.startswith("agentPort::") for t in ctx.list("systemTags")):
            dup = (
                await s.execute(
                    select(m.Host.uuid).where(m.Host.managementIp == ip, m.Host.hypervisorType != SIMULATOR)
                )
            ).first()
            if dup:
                raise invalid(f"a host with managementIp {ip} already exists")
        url = agent_url(ctx.p.settings, hypervisor, ip, [str(t) for t in ctx.list("systemTags")])
        if hypervisor != SIMULATOR and (await s.execute(select(m.Host.uuid).where(m.Host.agentUrl == url))).first():
            raise invalid(f"a host with managementIp {ip} and this agent port already exists ({url})")
        host = m.Host(
            uuid=uuid,
            name=ctx.req("name"),
            description=ctx.str("description"),
            zoneUuid=cluster.zoneUuid,
            clusterUuid=cluster.uuid,
            managementIp=ip,
            hypervisorType=hypervisor,
            status="Connecting",
            agentUrl=agent_url(ctx.p.settings, hypervisor, ip, [str(t) for t in ctx.list("systemTags")]),
            **extra,
        )
        s.add(host)
        await add_creation_tags(s, ctx, uuid, "HostVO")
    tags = [str(t) for t in ctx.list("systemTags")]
    try:
        async with ctx.p.queues.serial(uuid):
            await deploy.ensure_agent(ctx.p, uuid, url, login, ctx.api_uuid, _hand_managed(hypervisor, tags))
            await connect(ctx.p, uuid)
    except BaseException as err:
        # ZStack's rule: a host that cannot be connected (or deployed, or in time) is not added
        async with ctx.p.db.tx() as s:
            row = await s.get(m.Host, uuid)
            if row is not None:
                await s.delete(row)
            await disown(s, [uuid])
        if not isinstance(err, ApiError):
            raise
        raise ApiError(err.code, f"Cannot add host {ctx.req('managementIp')}: {err.description}", err.details) from None
    async with ctx.p.db.tx() as s:
        return {"inventory": await inv(s, "QueryObjectHostInventory", await load(s, m.Host, uuid, ctx, "Host"))}


def _hand_managed(hypervisor: str, tags: list[str]) -> bool:
    """A host whose agent the node never deploys: simulated, or one of several agents on one
    machine (``agentPort::``: the all-in-one, the tests)."""
    return hypervisor != KVM or any(t.startswith("agentPort::") for t in tags)


@api("AddKVMHost", admin=True)
async def add_kvm_host(ctx: ApiContext) -> dict[str, Any]:
    # the password (or key) serves the SSH deployment only and is never kept: the node reaches the
    # agent with certificates (wire/pki.py) and redeploys with its own key (compute/deploy.py), so
    # a stolen database holds no host's root password
    password, key = ctx.str("password"), ctx.str("sshPrivateKey")
    if not password and not key:
        raise invalid("missing mandatory field password of AddKVMHost (or sshPrivateKey)")
    port = ctx.int("port", 22, minimum=1) or 22
    if port > 65535:
        raise invalid(f"port {port} is not a TCP port")
    username = ctx.req("username")
    login = deploy.login_of(ctx.req("managementIp"), port, username, password, key)
    return await _add_host(ctx, KVM, {"username": username, "sshPort": port}, login)


@api("AddSimulatorHost", admin=True)
async def add_simulator_host(ctx: ApiContext) -> dict[str, Any]:
    return await _add_host(
        ctx,
        SIMULATOR,
        {
            "simCpuCapacity": ctx.int("cpuCapacity", minimum=1),
            "simMemoryCapacity": ctx.int("memoryCapacity", minimum=1),
        },
    )


@api("ReconnectHost", admin=True)
async def reconnect_host(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        host = await load(s, m.Host, ctx.req("uuid"), ctx, "Host")
        tags = await system_tags(s, host.uuid)
    async with ctx.p.queues.serial(host.uuid):
        if not _hand_managed(host.hypervisorType, tags):
            # an agent that is down or of another release is redeployed with the node's own key
            login = deploy.node_login(ctx.p, host.managementIp, host.sshPort or 22, host.username or "root")
            try:
                await deploy.ensure_agent(ctx.p, host.uuid, str(host.agentUrl), login, ctx.api_uuid, False)
            except ApiError:
                # its agent did not answer (that is why it was redeployed), nor does it now
                async with ctx.p.db.tx() as s:
                    await s.execute(update(m.Host).where(m.Host.uuid == host.uuid).values(status="Disconnected"))
                raise
        await connect(ctx.p, host.uuid, rotate=True)
    async with ctx.p.db.tx() as s:
        return {"inventory": await inv(s, "QueryObjectHostInventory", await load(s, m.Host, host.uuid, ctx, "Host"))}


async def rotate_credentials(platform: Platform, host_uuid: str, url: str) -> None:
    """A new key and certificate for the host's agent, sent over the wire it already trusts: the
    operator copies nothing. An agent that cannot be reached keeps the ones it has."""
    bundle = platform.pki.issue(pki.AGENT, pki.agent_name(url), [urlsplit(url).hostname or ""])
    await platform.agents.call(url, "/host/credentials", {"hostUuid": host_uuid, "bundle": bundle.decode()})


@api("ChangeHostState", admin=True)
async def change_host_state(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        host = await load(s, m.Host, ctx.req("uuid"), ctx, "Host")
        new = state_event(
            ctx.req("stateEvent"), {"enable": "Enabled", "disable": "Disabled", "maintain": "Maintenance"}
        )
        if new == "Maintenance":
            running = (
                await s.execute(
                    select(func.count())
                    .select_from(m.VmInstance)
                    .where(m.VmInstance.hostUuid == host.uuid, m.VmInstance.state == "Running")
                )
            ).scalar_one()
            if running:
                raise not_allowed(f"host {host.uuid} still runs {running} VMs; stop or migrate them first")
        host.state = new
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectHostInventory", host)}


@api("UpdateHost", admin=True)
async def update_host(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        host = await load(s, m.Host, ctx.req("uuid"), ctx, "Host")
        update_fields(host, ctx)
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectHostInventory", host)}


@api("DeleteHost", admin=True)
async def delete_host(ctx: ApiContext) -> dict[str, Any]:
    uuid = ctx.req("uuid")
    async with ctx.p.queues.serial(uuid):
        async with ctx.p.db.tx() as s:
            host = await load(s, m.Host, uuid, ctx, "Host")
            vms = (
                await s.execute(
                    select(func.count())
                    .select_from(m.VmInstance)
                    .where(m.VmInstance.hostUuid == uuid, m.VmInstance.state.in_(HOLDS_CAPACITY))
                )
            ).scalar_one()
            if vms:
                raise not_allowed(f"host {uuid} still has {vms} VMs; destroy or migrate them first")
            await primary.drop_host(s, uuid)
            await s.delete(host)
            await disown(s, [uuid])
    await gc.run(ctx.p, uuid)  # what waited for the host is moot now: its entries are Done
    return {}


@api("GetHypervisorTypes")
async def get_hypervisor_types(ctx: ApiContext) -> dict[str, Any]:
    return {"hypervisorTypes": list(HYPERVISOR_TYPES)}


CPU_MEMORY_SCOPES = {
    "zoneUuids": Scope(m.Zone, "Zone", lambda uuids: m.Host.zoneUuid.in_(uuids)),
    "clusterUuids": Scope(m.Cluster, "Cluster", lambda uuids: m.Host.clusterUuid.in_(uuids)),
    "hostUuids": Scope(m.Host, "Host", lambda uuids: m.Host.uuid.in_(uuids)),
}


@api("GetCpuMemoryCapacity", admin=True)
async def get_cpu_memory_capacity(ctx: ApiContext) -> dict[str, Any]:
    """CPU (MHz) and memory (bytes) of the hosts in some zones, clusters or hosts (or ``all``),
    and what their VMs leave free. As ZStack counts them: only the hosts VMs can be placed on now
    (Enabled and Connected)."""
    h = m.Host
    total_cpu, available_cpu, total_memory, available_memory = await capacity_sums(
        ctx, CPU_MEMORY_SCOPES,
        (h.totalCpuCapacity, h.availableCpuCapacity, h.totalMemoryCapacity, h.availableMemoryCapacity),
        h.state == "Enabled", h.status == "Connected",
    )
    return {"totalCpu": total_cpu, "availableCpu": available_cpu,
            "totalMemory": total_memory, "availableMemory": available_memory}


PING_BATCH = "/host/ping-batch"


Answers = dict[str, dict[str, Any]]  # host uuid → its ping's answer


async def _ping_one(platform: Platform, url: str, uuid: str, timeout: float) -> tuple[Answers, str]:
    """({uuid: its answer}, ""), or ({}, why) when the host did not answer twice: one slow answer
    from a host (or from this node) under a burst of load is not a lost host. A dead agent
    refuses at once, twice."""
    why = ""
    for _ in (1, 2):
        try:
            return {uuid: await platform.agents.call(url, "/host/ping", {"hostUuid": uuid}, timeout=timeout)}, ""
        except ApiError as err:
            why = err.details
    return {}, why


async def _ping_endpoint(platform: Platform, url: str, uuids: list[str], timeout: float) -> tuple[Answers, str]:
    """The answers of the hosts one agent endpoint serves. A KVM agent serves one host: its own
    ping, as ever. The simulator serves many: one ``/host/ping-batch`` request for all of them
    (a round of 25,000 simulated hosts was 25,000 requests), and once more for those missing
    from the answer or when the request failed, as a single host's ping is tried twice."""
    if len(uuids) == 1:
        return await _ping_one(platform, url, uuids[0], timeout)
    answers: Answers = {}
    wanted, why = list(uuids), ""
    for _ in (1, 2):
        try:
            reply = await platform.agents.call(url, PING_BATCH, {"hostUuids": wanted, "timeout": timeout},
                                               timeout=timeout)
        except ApiError as err:
            if err.code == AGENT_ERROR and "AGENT_UNKNOWN_COMMAND" in err.details:
                # an agent from before batched pings: each host on its own
                found = await asyncio.gather(*(_ping_one(platform, url, u, timeout) for u in wanted))
                for one, one_why in found:
                    answers.update(one)
                    why = why or one_why
                return answers, why
            why = err.details
            continue
        hosts = reply.get("hosts") or {}
        answers.update({u: hosts[u] for u in wanted if isinstance(hosts.get(u), dict)})
        wanted = [u for u in wanted if u not in answers]
        why = f"missing from the batched ping answer of {url}"
        if not wanted:
            break
    return answers, why


async def ping_all(platform: Platform) -> None:
    """One round of pings, one request per agent endpoint; a host that fails turns Disconnected,
    one that answers again reconnects."""
    async with platform.db.tx() as s:
        hosts = (
            await s.execute(select(m.Host.uuid, m.Host.agentUrl, m.Host.status).where(m.Host.status != "Connecting"))
        ).all()
    timeout = await platform.config.get("host", "ping.timeout")
    auto = await platform.config.get("host", "connection.autoReconnectOnError")
    by_url: dict[str, dict[str, str]] = defaultdict(dict)
    for uuid, url, status in hosts:
        by_url[str(url)][uuid] = status
    sem = asyncio.Semaphore(50)

    async def reconnect(uuid: str) -> None:
        async with sem:
            log.info("host %s answers again; reconnecting", uuid)
            try:
                async with platform.queues.serial(uuid):
                    await connect(platform, uuid)
            except ApiError as err:
                log.warning("reconnecting host %s failed: %s", uuid, err)

    async def endpoint(url: str, members: dict[str, str]) -> None:
        async with sem:
            answers, why = await _ping_endpoint(platform, url, sorted(members), timeout)
        lost = [u for u, status in members.items() if u not in answers and status == "Connected"]
        if lost:
            for uuid in lost:
                log.warning("host %s is Disconnected: %s", uuid, why)
            async with platform.db.tx() as s:
                for chunk in range(0, len(lost), 5000):  # bound the IN list
                    await s.execute(
                        update(m.Host)
                        .where(m.Host.uuid.in_(lost[chunk : chunk + 5000]), m.Host.status == "Connected")
                        .values(status="Disconnected")
                    )
        back = [
            u for u, reply in answers.items()
            if (members[u] == "Disconnected" and auto) or not reply.get("connected", True)
        ]
        await asyncio.gather(*(reconnect(u) for u in back))

    await asyncio.gather(*(endpoint(url, members) for url, members in by_url.items()))


async def ping_loop(platform: Platform) -> None:
    while True:
        try:
            await asyncio.sleep(await platform.config.get("host", "ping.interval"))
            await ping_all(platform)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("host ping round failed")
