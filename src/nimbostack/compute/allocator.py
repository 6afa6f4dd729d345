"""Placement and capacity: candidate hosts, taking and giving back host capacity, what a VM holds and its release."""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, delete, func, select, update

from nimbostack.core.errors import ALLOCATION_FAILED, ApiError, not_allowed
from nimbostack.core.resources import (
    disown,
)
from nimbostack.db import models as m
from nimbostack.db.engine import NO_SYNC, records
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
    s: Any,
    cpu: int,
    mem: int,
    l3_uuids: list[str],
    zone: str | None,
    cluster: str | None,
    host: str | None,
    ps_uuids: set[str] | None = None,
) -> list[m.Host]:
    l2s = sorted(set((await s.execute(_L2S_OF_L3S, {"l3s": l3_uuids})).scalars()))
    ps_list = sorted(ps_uuids or ())
    params: dict[str, Any] = {"cpu": cpu, "mem": mem, "zone": zone, "cluster": cluster, "host": host}
    params.update({f"l2_{i}": u for i, u in enumerate(l2s)})
    params.update({f"ps_{i}": u for i, u in enumerate(ps_list)})
    shape = (len(l2s), bool(zone), bool(cluster), bool(host), len(ps_list))
    stmt = _CANDIDATES.get(shape)
    if stmt is None:
        stmt = _CANDIDATES[shape] = _candidates_statement(*shape)
    return list((await s.execute(stmt, params)).scalars())


_L2S_OF_L3S = select(m.L3Network.l2NetworkUuid).where(m.L3Network.uuid.in_(bindparam("l3s", expanding=True)))


# the candidate-host statement of each shape (how many L2s, which filters), built once
_CANDIDATES: dict[tuple[int, bool, bool, bool, int], Any] = {}


def _candidates_statement(l2s: int, zone: bool, cluster: bool, host: bool, ps_uuids: int) -> Any:
    stmt = (
        select(m.Host)
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
    for i in range(l2s):  # the host's cluster must reach every L2 the VM's networks sit on
        stmt = stmt.where(
            m.Host.clusterUuid.in_(
                select(m.L2NetworkClusterRef.clusterUuid).where(
                    m.L2NetworkClusterRef.l2NetworkUuid == bindparam(f"l2_{i}")
                )
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
    # the callers read the hosts, and take one by _RESERVE_HOST: records will do
    return records(stmt.order_by(m.Host.availableMemoryCapacity.desc()).limit(8))


# the WHERE makes the check-and-take atomic even with other management nodes writing
_RESERVE_HOST = (
    update(m.Host)
    .where(
        m.Host.uuid == bindparam("host"),
        m.Host.availableCpuCapacity >= bindparam("cpu"),
        m.Host.availableMemoryCapacity >= bindparam("mem"),
    )
    .values(
        availableCpuCapacity=m.Host.availableCpuCapacity - bindparam("cpu"),
        availableMemoryCapacity=m.Host.availableMemoryCapacity - bindparam("mem"),
    )
)


async def reserve_host(s: Any, host_uuid: str, cpu: int, mem: int) -> bool:
    res = await s.execute(_RESERVE_HOST, {"host": host_uuid, "cpu": cpu, "mem": mem}, execution_options=NO_SYNC)
    return bool(res.rowcount)


async def take_host(s: Any, hosts: list[m.Host], cpu: int, mem: int) -> m.Host:
    for h in hosts:
        if await reserve_host(s, h.uuid, cpu, mem):
            return h
    raise no_host(cpu, mem)


async def give_back_host(s: Any, host_uuid: str | None, cpu: int, mem: int) -> None:
    if host_uuid:
        await s.execute(
            update(m.Host)
            .where(m.Host.uuid == host_uuid)
            .values(
                availableCpuCapacity=m.Host.availableCpuCapacity + cpu,
                availableMemoryCapacity=m.Host.availableMemoryCapacity + mem,
            )
        )


def no_host(cpu: int, mem: int) -> ApiError:
    return ApiError(
        ALLOCATION_FAILED,
        "No host can run the VM",
        f"no Connected, Enabled host with {cpu} MHz CPU and {mem} bytes memory free reaches all of the "
        "VM's L3 networks and has primary storage attached",
    )


async def release_all(s: Any, vm_uuid: str, release_volumes: bool) -> None:
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


async def volume_placement(s: Any, vm_uuid: str) -> tuple[str | None, set[str]]:
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


async def recompute_capacity(platform: Platform, host_uuid: str | None = None) -> None:
    """Available = total − what the host's VMs hold. Derived, so a crash cannot leave it wrong."""
    async with platform.db.tx() as s:
        hosts = [await s.get(m.Host, host_uuid)] if host_uuid else (await s.execute(select(m.Host))).scalars().all()
        for host in hosts:
            if host is None:
                continue
            cpu, mem = (
                await s.execute(
                    select(
                        func.coalesce(func.sum(m.VmInstance.cpuNum * m.VmInstance.cpuSpeed), 0),
                        func.coalesce(func.sum(m.VmInstance.memorySize), 0),
                    ).where(m.VmInstance.hostUuid == host.uuid, m.VmInstance.state.in_(HOLDS_CAPACITY))
                )
            ).one()
            host.availableCpuCapacity = host.totalCpuCapacity - int(cpu)
            host.availableMemoryCapacity = host.totalMemoryCapacity - int(mem)
