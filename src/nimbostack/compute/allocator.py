"""Placement and capacity: candidate hosts, taking and giving back host capacity, what a VM holds and its release."""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, bindparam, delete, func, select, update

from nimbostack.core.errors import ALLOCATION_FAILED, ApiError, not_allowed
from nimbostack.core.resources import (
    disown,
)
from nimbostack.db import models as m
from nimbostack.db.engine import Tx, columns, rowcount, table_of
from nimbostack.network import ipam
from nimbostack.storage import primary

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

# VM states whose CPU and memory stay reserved on their host
HOLDS_CAPACITY = (
    "Created",
    "Starting",
    "Running",
    "Stopping",
    "Rebooting",
    "Pausing",
    "Paused",
    "Resuming",
    "Migrating",
    "Destroying",
    "Unknown",
)


def new_mac() -> str:
    return "fa:" + ":".join(f"{random.randint(0, 255):02x}" for _ in range(5))


async def candidate_hosts(
    s: Tx,
    cpu: int,
    mem: int,
    l3_uuids: list[str],
    zone: str | None,
    cluster: str | None,
    host: str | None,
    ps_uuids: set[str] | None = None,
    every: bool = False,
) -> list[Row[Any]]:
    """Up to 8 hosts that can take the VM (``every``: all of them), most free memory first: rows
    of the Host's columns (the callers read them, and take one by reserve_host)."""
    l3s = sorted(set(l3_uuids))
    ps_list = sorted(ps_uuids or ())
    params: dict[str, Any] = {"cpu": cpu, "mem": mem, "zone": zone, "cluster": cluster, "host": host}
    params.update({f"l3_{i}": u for i, u in enumerate(l3s)})
    params.update({f"ps_{i}": u for i, u in enumerate(ps_list)})
    shape = (len(l3s), bool(zone), bool(cluster), bool(host), len(ps_list))
    stmt = _CANDIDATES.get(shape)
    if stmt is None:
        stmt = _CANDIDATES[shape] = _candidates_statement(*shape)
    return list((await s.execute(stmt.limit(None) if every else stmt, params)).all())


# the candidate-host statement of each shape (how many L3s, which filters), built once
_CANDIDATES: dict[tuple[int, bool, bool, bool, int], Any] = {}


def _candidates_statement(l3s: int, zone: bool, cluster: bool, host: bool, ps_uuids: int) -> Any:
    stmt = (
        select(*columns(m.Host))
        .join(m.Cluster, m.Cluster.uuid == m.Host.clusterUuid)
        .where(
            m.Host.status == "Connected",
            m.Host.state == "Enabled",
            m.Cluster.state == "Enabled",
            m.Host.availableCpuCapacity >= bindparam("cpu"),
            m.Host.availableMemoryCapacity >= bindparam("mem"),
            m.Host.clusterUuid.in_(select(m.PrimaryStorageClusterRef.clusterUuid)),
        )
    )
    for i in range(l3s):  # the host's cluster must reach the L2 each of the VM's networks sits on
        stmt = stmt.where(
            m.Host.clusterUuid.in_(
                select(m.L2NetworkClusterRef.clusterUuid)
                .join(m.L3Network, m.L3Network.l2NetworkUuid == m.L2NetworkClusterRef.l2NetworkUuid)
                .where(m.L3Network.uuid == bindparam(f"l3_{i}"))
            )
        )
    if zone:
        stmt = stmt.where(m.Host.zoneUuid == bindparam("zone"))
    if cluster:
        stmt = stmt.where(m.Host.clusterUuid == bindparam("cluster"))
    if host:
        stmt = stmt.where(m.Host.uuid == bindparam("host"))
    for i in range(ps_uuids):  # the host's cluster must reach every primary storage the VM's volumes are on
        stmt = stmt.where(
            m.Host.clusterUuid.in_(
                select(m.PrimaryStorageClusterRef.clusterUuid).where(
                    m.PrimaryStorageClusterRef.primaryStorageUuid == bindparam(f"ps_{i}")
                )
            )
        )
    return stmt.order_by(m.Host.availableMemoryCapacity.desc()).limit(8)


# Host capacity is taken and given back by UPDATEs of the table, not through loaded objects: the
# WHERE makes the check-and-take atomic even with other management nodes writing, and a Host object
# loaded in the same transaction is not kept in step (none reads its capacity afterwards).
HOST = table_of(m.Host)
_RESERVE_HOST = (
    update(HOST)
    .where(
        HOST.c.uuid == bindparam("host"),
        HOST.c.availableCpuCapacity >= bindparam("cpu"),
        HOST.c.availableMemoryCapacity >= bindparam("mem"),
    )
    .values(
        availableCpuCapacity=HOST.c.availableCpuCapacity - bindparam("cpu"),
        availableMemoryCapacity=HOST.c.availableMemoryCapacity - bindparam("mem"),
    )
)


async def reserve_host(s: Tx, host_uuid: str, cpu: int, mem: int) -> bool:
    res = await s.execute(_RESERVE_HOST, {"host": host_uuid, "cpu": cpu, "mem": mem})
    return rowcount(res) > 0


async def take_host(s: Tx, hosts: list[Row[Any]], cpu: int, mem: int) -> Row[Any]:
    for h in hosts:
        if await reserve_host(s, h.uuid, cpu, mem):
            return h
    raise no_host(cpu, mem)


async def give_back_host(s: Tx, host_uuid: str | None, cpu: int, mem: int) -> None:
    if host_uuid:
        await s.execute(_GIVE_BACK_HOST, {"host": host_uuid, "cpu": cpu, "mem": mem})


_GIVE_BACK_HOST = (
    update(HOST)
    .where(HOST.c.uuid == bindparam("host"))
    .values(
        availableCpuCapacity=HOST.c.availableCpuCapacity + bindparam("cpu"),
        availableMemoryCapacity=HOST.c.availableMemoryCapacity + bindparam("mem"),
    )
)


def no_host(cpu: int, mem: int) -> ApiError:
    return ApiError(
        ALLOCATION_FAILED,
        "No host can run the VM",
        f"no Connected, Enabled host with {cpu} MHz CPU and {mem} bytes memory free reaches all of the "
        "VM's L3 networks and has primary storage attached",
    )


async def release_all(s: Tx, vm_uuid: str, release_volumes: bool) -> None:
    """Give back everything a VM holds: host capacity, IPs, NICs; and its volumes if asked."""
    vm = await s.get(m.VmInstance, vm_uuid)
    if vm is None:
        return
    if vm.hostUuid and vm.state in HOLDS_CAPACITY:
        await give_back_host(s, vm.hostUuid, vm.cpuNum * vm.cpuSpeed, vm.memorySize)
    nics = (await s.execute(select(m.VmNic).where(m.VmNic.vmInstanceUuid == vm_uuid))).scalars().all()
    await ipam.release(s, [n.usedIpUuid for n in nics if n.usedIpUuid])
    await s.execute(delete(m.VmNic).where(m.VmNic.vmInstanceUuid == vm_uuid))
    if release_volumes:
        vols = (await s.execute(select(m.Volume).where(m.Volume.vmInstanceUuid == vm_uuid))).scalars().all()
        for vol in vols:
            await primary.release(s, vol.uuid)
            await s.delete(vol)
        await disown(s, [v.uuid for v in vols])
    vm.hostUuid = None


async def volume_placement(s: Tx, vm_uuid: str) -> tuple[str | None, set[str]]:
    """(the host the VM's volumes tie it to — local storage — or None; their primary storages)."""
    vols = (
        await s.execute(
            select(m.Volume.hostUuid, m.Volume.primaryStorageUuid).where(
                m.Volume.vmInstanceUuid == vm_uuid, m.Volume.primaryStorageUuid.is_not(None)
            )
        )
    ).all()
    hosts = {h for h, _ in vols if h}
    if len(hosts) > 1:
        raise not_allowed(
            f"VM {vm_uuid}'s volumes are on the local storage of several hosts ({', '.join(sorted(hosts))}); "
            "migrate them to one host first (LocalStorageMigrateVolume)"
        )
    return (hosts.pop() if hosts else None), {ps for _, ps in vols}


def _held(what: Any) -> Any:
    """What the VMs of the host being updated hold of a figure: a subquery of the UPDATE."""
    return (
        select(func.coalesce(func.sum(what), 0))
        .where(m.VmInstance.hostUuid == HOST.c.uuid, m.VmInstance.state.in_(HOLDS_CAPACITY))
        .scalar_subquery()
    )


# one statement, built once: a host (re)connects and every restart reconnects them all
_RECOMPUTE = (
    update(HOST)
    .where(HOST.c.uuid == bindparam("host"))
    .values(
        availableCpuCapacity=HOST.c.totalCpuCapacity - _held(m.VmInstance.cpuNum * m.VmInstance.cpuSpeed),
        availableMemoryCapacity=HOST.c.totalMemoryCapacity - _held(m.VmInstance.memorySize),
    )
)


async def recompute_capacity(platform: Platform, host_uuid: str) -> None:
    """Available = total − what the host's VMs hold. Derived, so a crash cannot leave it wrong;
    one host's VMs only, so it costs the same however many hosts there are."""
    async with platform.db.tx() as s:
        await s.execute(_RECOMPUTE, {"host": host_uuid})
