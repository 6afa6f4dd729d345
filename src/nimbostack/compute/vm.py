"""VM instances: creation flow, lifecycle operations, console and boot order."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.exc import NoResultFound

from nimbostack.compute.host import HOLDS_CAPACITY
from nimbostack.core import expunger, gc, query
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import ALLOCATION_FAILED, IP_ALLOCATION_FAILED, ApiError, invalid, not_allowed
from nimbostack.core.flow import FlowChain
from nimbostack.core.resources import (
    add_creation_tags,
    disown,
    inv,
    load,
    new_uuid,
    own,
    register_queries,
    update_fields,
)
from nimbostack.core.tags import system_tags, tag_value
from nimbostack.db import models as m
from nimbostack.db.engine import get_record, insert_now, records
from nimbostack.network import ipam
from nimbostack.storage import primary
from nimbostack.wire import DiskSpec, NicSpec, VmSpec

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

# ORM UPDATEs on the create path run in sessions that hold no object of the updated class (a new
# session, or one with only hosts and storage loaded): "evaluate" synchronisation would only scan
# the identity map for nothing, at a cost measured at ~5% of a VM create.
_NO_SYNC = {"synchronize_session": False}

_NIC_FIELDS = [
    "uuid",
    "vmInstanceUuid",
    "l3NetworkUuid",
    "ip",
    "mac",
    "netmask",
    "gateway",
    "metaData",
    "deviceId",
    "createDate",
    "lastOpDate",
]


# built once (db/engine.py, "Statements built once"): every create answers an inventory
# read only: as records (db/engine.py)
_NICS_OF_VMS = records(
    select(m.VmNic).where(m.VmNic.vmInstanceUuid.in_(bindparam("vms", expanding=True))).order_by(m.VmNic.deviceId)
)
_VOLUMES_OF_VMS = records(
    select(m.Volume).where(m.Volume.vmInstanceUuid.in_(bindparam("vms", expanding=True))).order_by(m.Volume.deviceId)
)


async def _vm_extra(s: Any, rows: Any, invs: list[dict[str, Any]]) -> None:
    uuids = [r.uuid for r in rows]
    nics: dict[str, list[dict[str, Any]]] = {}
    for nic in (await s.execute(_NICS_OF_VMS, {"vms": uuids})).scalars():
        nics.setdefault(nic.vmInstanceUuid, []).append(query.plain(nic, _NIC_FIELDS))
    vols: dict[str, list[dict[str, Any]]] = {}
    vol_rows = (await s.execute(_VOLUMES_OF_VMS, {"vms": uuids})).scalars().all()
    for vol, out in zip(
        vol_rows, await query.inventories(s, query.TARGETS["QueryObjectVolumeInventory"], vol_rows), strict=True
    ):
        vols.setdefault(vol.vmInstanceUuid, []).append(out)
    for row, out in zip(rows, invs, strict=True):
        out["vmNics"] = nics.get(row.uuid, [])
        out["allVolumes"] = vols.get(row.uuid, [])


class _NicTarget(query.QueryTarget):
    def fields(self) -> list[str]:
        return _NIC_FIELDS


query.register(
    query.QueryTarget(
        "QueryObjectVmInstanceInventory",
        m.VmInstance,
        "VmInstanceInventory",
        scope="owned",
        extra=_vm_extra,
        base_filter=lambda: m.VmInstance.type == "UserVm",
        joins={
            "vmNics": query.Join("uuid", "QueryObjectVmNicInventory", "vmInstanceUuid"),
            "allVolumes": query.Join("uuid", "QueryObjectVolumeInventory", "vmInstanceUuid"),
            "rootVolume": query.Join("rootVolumeUuid", "QueryObjectVolumeInventory", "uuid"),
            "host": query.Join("hostUuid", "QueryObjectHostInventory", "uuid"),
            "cluster": query.Join("clusterUuid", "QueryObjectClusterInventory", "uuid"),
            "zone": query.Join("zoneUuid", "QueryObjectZoneInventory", "uuid"),
            "image": query.Join("imageUuid", "QueryObjectImageInventory", "uuid"),
            "instanceOffering": query.Join("instanceOfferingUuid", "QueryObjectInstanceOfferingInventory", "uuid"),
        },
    )
)
query.register(
    _NicTarget(
        "QueryObjectVmNicInventory",
        m.VmNic,
        scope="owned",
        owner_column="vmInstanceUuid",
        joins={
            "vmInstance": query.Join("vmInstanceUuid", "QueryObjectVmInstanceInventory", "uuid"),
            "l3Network": query.Join("l3NetworkUuid", "QueryObjectL3NetworkInventory", "uuid"),
        },
    )
)
register_queries("QueryVmInstance", "QueryVmNic")


def _mac() -> str:
    return "fa:" + ":".join(f"{random.randint(0, 255):02x}" for _ in range(5))


# --- placement ---------------------------------------------------------------------------------


async def _candidate_hosts(
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


async def _reserve_host(s: Any, host_uuid: str, cpu: int, mem: int) -> bool:
    res = await s.execute(_RESERVE_HOST, {"host": host_uuid, "cpu": cpu, "mem": mem}, execution_options=_NO_SYNC)
    return bool(res.rowcount)


async def _take_host(s: Any, hosts: list[m.Host], cpu: int, mem: int) -> m.Host:
    for h in hosts:
        if await _reserve_host(s, h.uuid, cpu, mem):
            return h
    raise _no_host(cpu, mem)


async def _give_back_host(s: Any, host_uuid: str | None, cpu: int, mem: int) -> None:
    if host_uuid:
        await s.execute(
            update(m.Host)
            .where(m.Host.uuid == host_uuid)
            .values(
                availableCpuCapacity=m.Host.availableCpuCapacity + cpu,
                availableMemoryCapacity=m.Host.availableMemoryCapacity + mem,
            )
        )


def _no_host(cpu: int, mem: int) -> ApiError:
    return ApiError(
        ALLOCATION_FAILED,
        "No host can run the VM",
        f"no Connected, Enabled host with {cpu} MHz CPU and {mem} bytes memory free reaches all of the "
        "VM's L3 networks and has primary storage attached",
    )


# --- agent spec --------------------------------------------------------------------------------


# each NIC with its L2 network in one statement, not one more per NIC (every start asks)
_NICS_WITH_L2 = records(
    select(m.VmNic, m.L2Network)
    .outerjoin(m.L3Network, m.L3Network.uuid == m.VmNic.l3NetworkUuid)
    .outerjoin(m.L2Network, m.L2Network.uuid == m.L3Network.l2NetworkUuid)
    .where(m.VmNic.vmInstanceUuid == bindparam("vm"))
    .order_by(m.VmNic.deviceId)
)


async def build_spec(platform: Platform, vm_uuid: str) -> VmSpec:
    cache = await platform.config.get("kvm", "vm.cacheMode")
    async with platform.db.tx() as s:
        vm = await get_record(s, m.VmInstance, vm_uuid)
        assert vm is not None
        vols = (await s.execute(_VOLUMES_OF_VMS, {"vms": [vm_uuid]})).scalars().all()
        nic_l2s = (await s.execute(_NICS_WITH_L2, {"vm": vm_uuid})).all()
        nics = [nic for nic, _ in nic_l2s]
        l2s: dict[str, m.L2Network] = {}
        bridges: dict[str, str] = {}
        for nic, l2 in nic_l2s:
            if l2 is None:  # as the per-NIC scalar_one() this replaces did: a NIC on a vanished network
                raise NoResultFound("No row was found when one was required")
            bridges[nic.uuid] = bridge_name(l2, await system_tags(s, l2.uuid))
            l2s[nic.uuid] = l2
    iso_path = await cached_image_path(platform, vm.hostUuid, vm.isoUuid) if vm.isoUuid and vm.hostUuid else None
    return VmSpec(
        uuid=vm.uuid,
        name=vm.name,
        cpu_num=vm.cpuNum,
        memory=vm.memorySize,
        disks=[DiskSpec(v.uuid, v.installPath or "", v.deviceId or 0, v.format, cache) for v in vols],
        nics=[
            NicSpec(
                n.uuid,
                n.mac,
                bridges[n.uuid],
                n.deviceId,
                n.ip or "",
                n.netmask or "",
                n.gateway or "",
                n.l3NetworkUuid,
                l2s[n.uuid].physicalInterface,
                l2s[n.uuid].vlan,
            )
            for n in nics
        ],
        iso_path=iso_path,
        boot_order=vm.bootOrder.split(","),
        console_mode=await platform.config.get("kvm", "vm.consoleMode"),
        cpu_mode=await platform.config.get("kvm", "vm.cpuMode"),
    )


# whether each backup storage is in the zone comes with the copies, in the same statement rather
# than a second one (every VM create asks)
_IMAGE_COPIES = records(
    select(
        m.ImageBackupStorageRef,
        m.BackupStorage,
        select(m.BackupStorageZoneRef.id)
        .where(
            m.BackupStorageZoneRef.backupStorageUuid == m.BackupStorage.uuid,
            m.BackupStorageZoneRef.zoneUuid == bindparam("zone"),
        )
        .exists(),
    )
    .join(m.BackupStorage, m.BackupStorage.uuid == m.ImageBackupStorageRef.backupStorageUuid)
    .where(
        m.ImageBackupStorageRef.imageUuid == bindparam("image"),
        m.ImageBackupStorageRef.status == "Ready",
        m.BackupStorage.state == "Enabled",
    )
)


async def image_source(s: Any, image_uuid: str, zone_uuid: str | None) -> str:
    """The URL a host fetches the image from: a Ready copy on a backup storage of the zone."""
    from nimbostack.storage.backup import image_source as source

    rows = (await s.execute(_IMAGE_COPIES, {"image": image_uuid, "zone": zone_uuid})).all()
    if zone_uuid:
        rows = sorted(rows, key=lambda r: not r[2])
    if not rows:
        raise not_allowed(f"image {image_uuid} has no Ready copy on an Enabled backup storage")
    ref, bs = rows[0][0], rows[0][1]
    return source(bs, ref)


async def cached_image_path(platform: Platform, host_uuid: str, image_uuid: str) -> str:
    """Make sure the host's primary storage caches the image (an ISO to boot from); return the path."""
    async with platform.db.tx() as s:
        host = await s.get(m.Host, host_uuid)
        ps = (
            await s.execute(
                select(m.PrimaryStorage)
                .join(
                    m.PrimaryStorageClusterRef, m.PrimaryStorageClusterRef.primaryStorageUuid == m.PrimaryStorage.uuid
                )
                .where(m.PrimaryStorageClusterRef.clusterUuid == host.clusterUuid)
                .limit(1)
            )
        ).scalar_one_or_none()
        if ps is None:
            raise not_allowed(f"host {host_uuid}'s cluster has no primary storage to cache image {image_uuid}")
        image = await s.get(m.Image, image_uuid)
        url = await image_source(s, image_uuid, host.zoneUuid)
    reply = await agent(
        platform,
        host_uuid,
        primary.command(ps, "cache-image"),
        {"path": ps.url, "imageUuid": image_uuid, "imageUrl": url, "md5": image.md5Sum},
    )
    return str(reply["cachePath"])


def bridge_name(l2: m.L2Network, tags: list[str]) -> str:
    explicit = tag_value(tags, "bridge::")
    if explicit:
        return explicit
    name = f"br_{l2.physicalInterface}" + (f"_{l2.vlan}" if l2.vlan else "")
    return name[:15]


# Built once: every agent command of every VM operation runs it, and building the statement and its
# cache key each time cost as much as a third of running it. The key is memoised on this object.
_AGENT_URL = select(m.Host.status, m.Host.agentUrl).where(m.Host.uuid == bindparam("host_uuid"))


async def _agent_url_of(platform: Platform, host_uuid: str) -> str:
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
    url = url or await _agent_url_of(platform, host_uuid)
    return await platform.agents.call(url, path, {"hostUuid": host_uuid, **body})


# --- create ------------------------------------------------------------------------------------


@api("CreateVmInstance")
async def create_vm(ctx: ApiContext) -> dict[str, Any]:
    p = ctx.p
    l3_uuids = ctx.list("l3NetworkUuids")
    if not l3_uuids:
        raise invalid("l3NetworkUuids must name at least one L3 network")
    if len(set(l3_uuids)) != len(l3_uuids):
        raise invalid("l3NetworkUuids names one L3 network twice")
    default_l3 = ctx.str("defaultL3NetworkUuid") or l3_uuids[0]
    if default_l3 not in l3_uuids:
        raise invalid(f"defaultL3NetworkUuid {default_l3} is not one of l3NetworkUuids")
    vm_type = ctx.str("type", "UserVm") or "UserVm"
    async with p.db.tx() as s:
        # read only, as records (db/engine.py)
        offering = await load(
            s, m.InstanceOffering, ctx.req("instanceOfferingUuid"), ctx, "InstanceOffering", readonly=True
        )
        if offering.state != "Enabled":
            raise not_allowed(f"instance offering {offering.uuid} is {offering.state}")
        image = await load(s, m.Image, ctx.req("imageUuid"), ctx, "Image", readonly=True)
        if image.status != "Ready" or image.state != "Enabled":
            raise not_allowed(f"image {image.uuid} is {image.state}/{image.status}; it must be Enabled and Ready")
        root_size = image.size
        root_offering = ctx.str("rootDiskOfferingUuid")
        if image.mediaType == "ISO":
            if not root_offering:
                raise invalid("a VM created from an ISO needs rootDiskOfferingUuid for its empty root volume")
            root_size = (await load(s, m.DiskOffering, root_offering, ctx, "DiskOffering", readonly=True)).diskSize
        data_sizes = [
            (await load(s, m.DiskOffering, u, ctx, "DiskOffering", readonly=True)).diskSize
            for u in ctx.list("dataDiskOfferingUuids")
        ]
        for u in l3_uuids:
            l3 = await load(s, m.L3Network, u, ctx, "L3Network", readonly=True)
            if l3.state != "Enabled":
                raise not_allowed(f"L3 network {u} is {l3.state}")
        vm = m.VmInstance(
            uuid=new_uuid(ctx),
            name=ctx.req("name"),
            description=ctx.str("description"),
            imageUuid=image.uuid,
            instanceOfferingUuid=offering.uuid,
            platform=image.platform,
            defaultL3NetworkUuid=default_l3,
            type=vm_type,
            memorySize=offering.memorySize,
            cpuNum=offering.cpuNum,
            cpuSpeed=offering.cpuSpeed,
            allocatorStrategy=offering.allocatorStrategy,
            state="Created",
            bootOrder="CdRom,HardDisk" if image.mediaType == "ISO" else "HardDisk",
            isoUuid=image.uuid if image.mediaType == "ISO" else None,
        )
        await insert_now(s, vm)
        await own(s, ctx, vm.uuid, "VmInstanceVO")
        await add_creation_tags(s, ctx, vm.uuid, "VmInstanceVO")
        if image.mediaType == "ISO":
            await insert_now(
                s,
                m.SystemTag(
                    uuid=new_uuid(),
                    resourceUuid=vm.uuid,
                    resourceType="VmInstanceVO",
                    tag=ISO_INSTALL_TAG,
                    inherent=True,
                )
            )
    tags = [str(t) for t in ctx.list("systemTags")]
    static_ips = {t.split("::")[1]: t.split("::")[2] for t in tags if t.startswith("staticIp::")}
    cpu = vm.cpuNum * vm.cpuSpeed

    async def allocate(c: dict[str, Any]) -> None:
        """Host, storage, volumes and IPs in one transaction: all taken, or none."""
        async with p.db.tx() as s:
            hosts = await _candidate_hosts(
                s, cpu, vm.memorySize, l3_uuids, ctx.str("zoneUuid"), ctx.str("clusterUuid"), ctx.str("hostUuid")
            )
            chosen = c["host"] = await _take_host(s, hosts, cpu, vm.memorySize)
            placed: dict[str, Any] = {
                "hostUuid": chosen.uuid,
                "clusterUuid": chosen.clusterUuid,
                "zoneUuid": chosen.zoneUuid,
                "hypervisorType": "KVM" if chosen.hypervisorType == "KVM" else chosen.hypervisorType,
            }
            sizes = [("Root", root_size, None)] + [
                ("Data", size, u) for size, u in zip(data_sizes, ctx.list("dataDiskOfferingUuids"), strict=True)
            ]
            vols = []
            for device_id, (vtype, size, offering_uuid) in enumerate(sizes):
                vol_uuid = new_uuid()
                ps = await primary.reserve(s, chosen.clusterUuid, chosen.uuid, size, vol_uuid, "VolumeVO")
                ps_uuid = ps.uuid
                folder = "rootVolumes" if vtype == "Root" else "dataVolumes"
                vol = m.Volume(
                    uuid=vol_uuid,
                    name=f"ROOT-for-{vm.name}" if vtype == "Root" else f"DATA-for-{vm.name}",
                    description=f"{vtype} volume for VM[uuid:{vm.uuid}]",
                    primaryStorageUuid=ps_uuid,
                    vmInstanceUuid=vm.uuid,
                    rootImageUuid=image.uuid if vtype == "Root" else None,
                    diskOfferingUuid=offering_uuid,
                    type=vtype,
                    size=size,
                    deviceId=device_id,
                    hostUuid=primary.placement(ps, chosen.uuid),
                    status="Creating",
                    installPath=f"{ps.url}/{folder}/acct-{ctx.caller.account_uuid}/vol-{vol_uuid}/{vol_uuid}.qcow2",
                )
                await insert_now(s, vol)
                await own(s, ctx, vol_uuid, "VolumeVO")
                vols.append(vol)
                if vtype == "Root":
                    placed["rootVolumeUuid"] = vol_uuid
            # one UPDATE, not a read of the row and its write
            # no VmInstance is loaded in this session (vm was read by an earlier one)
            await s.execute(
                update(m.VmInstance).where(m.VmInstance.uuid == vm.uuid).values(**placed), execution_options=_NO_SYNC
            )
            c["volumes"] = [(v.installPath, v.size, v.type, v.primaryStorageUuid) for v in vols]
            c["ps"] = {u: await get_record(s, m.PrimaryStorage, u) for u in {v.primaryStorageUuid for v in vols}}
            if image.mediaType != "ISO":
                c["image_url"] = await image_source(s, image.uuid, chosen.zoneUuid)
            for device_id, l3_uuid in enumerate(l3_uuids):
                used = await ipam.allocate(s, l3_uuid, static_ips.get(l3_uuid))
                await insert_now(
                    s,
                    m.VmNic(
                        uuid=new_uuid(),
                        vmInstanceUuid=vm.uuid,
                        l3NetworkUuid=l3_uuid,
                        ip=used.ip,
                        mac=_mac(),
                        netmask=used.netmask,
                        gateway=used.gateway,
                        deviceId=device_id,
                        usedIpUuid=used.uuid,
                    )
                )

    async def deallocate(c: dict[str, Any]) -> None:
        if "host" not in c:
            return
        async with p.db.tx() as s:
            await _release_all(s, vm.uuid, release_volumes=True)

    async def create_volumes(c: dict[str, Any]) -> None:
        c["made"] = []
        for path, size, vtype, ps_uuid in c["volumes"]:
            ps = c["ps"][ps_uuid]
            body: dict[str, Any] = {"path": ps.url, "installPath": path, "size": size}
            if vtype == "Root" and image.mediaType != "ISO":
                body.update(imageUuid=image.uuid, imageUrl=c["image_url"], md5=image.md5Sum)
            else:
                body["empty"] = True
            # before the call: a command that times out may still have made the file
            c["made"].append((path, ps))
            await agent(p, c["host"].uuid, primary.command(ps, "create-root"), body, c["host"].agentUrl)

    async def delete_volumes(c: dict[str, Any]) -> None:
        for path, ps in c.get("made", []):
            await gc.call_or_defer(
                p,
                gc.DELETE_VOLUME_FILE,
                c["host"].uuid,
                primary.command(ps, "delete"),
                {"path": ps.url, "installPath": path},
            )

    async def start(c: dict[str, Any]) -> None:
        async with p.db.tx() as s:
            # a new session: nothing loaded to synchronise
            await s.execute(_VM_STARTING, {"vm": vm.uuid}, execution_options=_NO_SYNC)
            await s.execute(_VOLUMES_READY, {"vm": vm.uuid}, execution_options=_NO_SYNC)
        for hook in START_HOOKS:
            await hook(p, vm.uuid, c["host"].uuid)
        spec = await build_spec(p, vm.uuid)
        await agent(p, c["host"].uuid, "/vm/start", {"vm": asdict(spec)}, c["host"].agentUrl)

    async def unstart(c: dict[str, Any]) -> None:
        await gc.call_or_defer(p, gc.DESTROY_VM, c["host"].uuid, "/vm/destroy", {"vmUuid": vm.uuid}, vm.uuid)

    chain = (
        FlowChain("create-vm")
        .then("allocate", allocate, deallocate)
        .then("create-volumes", create_volumes, delete_volumes)
        .then("start", start, unstart)
    )
    async with p.queues.serial(vm.uuid):
        try:
            c = await chain.run({})
        except BaseException:
            async with p.db.tx() as s:
                row = await s.get(m.VmInstance, vm.uuid)
                if row is not None:
                    await s.delete(row)
                await disown(s, [vm.uuid])
            raise
        async with p.db.tx() as s:
            await s.execute(_VM_RUNNING, {"vm": vm.uuid, "host": c["host"].uuid}, execution_options=_NO_SYNC)
            row = await get_record(s, m.VmInstance, vm.uuid)
            return {"inventory": await inv(s, "QueryObjectVmInstanceInventory", row)}


_VM_STARTING = update(m.VmInstance).where(m.VmInstance.uuid == bindparam("vm")).values(state="Starting")
_VM_RUNNING = (
    update(m.VmInstance)
    .where(m.VmInstance.uuid == bindparam("vm"))
    .values(state="Running", lastHostUuid=bindparam("host"))
)
_VOLUMES_READY = update(m.Volume).where(m.Volume.vmInstanceUuid == bindparam("vm")).values(status="Ready")


# Network service providers hook here to set up DHCP/userdata for a VM before it boots.
START_HOOKS: list[Any] = []
STOP_HOOKS: list[Any] = []


async def _release_all(s: Any, vm_uuid: str, release_volumes: bool) -> None:
    """Give back everything a VM holds: host capacity, IPs, NICs; and its volumes if asked."""
    vm = await s.get(m.VmInstance, vm_uuid)
    if vm is None:
        return
    if vm.hostUuid and vm.state in HOLDS_CAPACITY:
        await _give_back_host(s, vm.hostUuid, vm.cpuNum * vm.cpuSpeed, vm.memorySize)
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


# --- lifecycle ---------------------------------------------------------------------------------


async def _vm_for(ctx: ApiContext, uuid: str | None = None) -> m.VmInstance:
    async with ctx.p.db.tx() as s:
        return await load(s, m.VmInstance, uuid or ctx.req("uuid"), ctx, "VmInstance", owned=True)


def _need_state(vm: m.VmInstance, *states: str) -> None:
    if vm.state not in states:
        raise not_allowed(f"VM {vm.uuid} is {vm.state}; this operation needs it {' or '.join(states)}")


async def _set_state(platform: Platform, vm_uuid: str, **values: Any) -> None:
    async with platform.db.tx() as s:
        await s.execute(update(m.VmInstance).where(m.VmInstance.uuid == vm_uuid).values(**values))


async def _vm_inv(ctx: ApiContext, vm_uuid: str) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        return {"inventory": await inv(s, "QueryObjectVmInstanceInventory", await s.get(m.VmInstance, vm_uuid))}


@api("StartVmInstance")
async def start_vm(ctx: ApiContext) -> dict[str, Any]:
    p = ctx.p
    vm = await _vm_for(ctx)
    async with p.queues.serial(vm.uuid):
        vm = await _vm_for(ctx, vm.uuid)
        if vm.state == "Running":
            return await _vm_inv(ctx, vm.uuid)
        _need_state(vm, "Stopped")
        cpu = vm.cpuNum * vm.cpuSpeed
        async with p.db.tx() as s:
            # a VM with volumes on local storage starts where they live; on shared storage anywhere
            # its storage is attached (its last host first)
            bound, ps_uuids = await volume_placement(s, vm.uuid)
            wanted = ctx.str("hostUuid")
            if wanted and bound and wanted != bound:
                raise not_allowed(
                    f"VM {vm.uuid}'s volumes are on the local storage of host {bound}; it cannot start on host "
                    f"{wanted}. Migrate its root volume there first (LocalStorageMigrateVolume)"
                )
            wanted = wanted or bound or (vm.lastHostUuid if not ps_uuids else None)
            l3s = list(
                (await s.execute(select(m.VmNic.l3NetworkUuid).where(m.VmNic.vmInstanceUuid == vm.uuid))).scalars()
            )
            hosts = await _candidate_hosts(s, cpu, vm.memorySize, l3s, None, ctx.str("clusterUuid"), wanted, ps_uuids)
            hosts.sort(key=lambda h: h.uuid != vm.lastHostUuid)
            chosen = await _take_host(s, hosts, cpu, vm.memorySize)
            await s.execute(
                update(m.VmInstance)
                .where(m.VmInstance.uuid == vm.uuid)
                .values(state="Starting", hostUuid=chosen.uuid, clusterUuid=chosen.clusterUuid)
            )
        try:
            for hook in START_HOOKS:
                await hook(p, vm.uuid, chosen.uuid)
            await agent(p, chosen.uuid, "/vm/start", {"vm": asdict(await build_spec(p, vm.uuid))})
        except BaseException:
            async with p.db.tx() as s:
                await _give_back_host(s, chosen.uuid, cpu, vm.memorySize)
                await s.execute(
                    update(m.VmInstance).where(m.VmInstance.uuid == vm.uuid).values(state="Stopped", hostUuid=None)
                )
            raise
        await _set_state(p, vm.uuid, state="Running", lastHostUuid=chosen.uuid)
        return await _vm_inv(ctx, vm.uuid)


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


async def stop_on_host(p: Platform, vm: m.VmInstance, graceful: bool = True) -> None:
    """Stop the domain and release the host's capacity; the VM ends Stopped."""
    await _set_state(p, vm.uuid, state="Stopping")
    try:
        await agent(p, vm.hostUuid, "/vm/stop", {"vmUuid": vm.uuid, "graceful": graceful, "timeout": 60})
    except BaseException:
        await _set_state(p, vm.uuid, state=vm.state)
        raise
    for hook in STOP_HOOKS:
        await hook(p, vm.uuid, vm.hostUuid)
    async with p.db.tx() as s:
        await _give_back_host(s, vm.hostUuid, vm.cpuNum * vm.cpuSpeed, vm.memorySize)
        await s.execute(
            update(m.VmInstance)
            .where(m.VmInstance.uuid == vm.uuid)
            .values(state="Stopped", hostUuid=None, lastHostUuid=vm.hostUuid)
        )


@api("StopVmInstance")
async def stop_vm(ctx: ApiContext) -> dict[str, Any]:
    vm = await _vm_for(ctx)
    async with ctx.p.queues.serial(vm.uuid):
        vm = await _vm_for(ctx, vm.uuid)
        if vm.state == "Stopped":
            return await _vm_inv(ctx, vm.uuid)
        _need_state(vm, "Running", "Paused", "Unknown")
        await stop_on_host(ctx.p, vm)
        return await _vm_inv(ctx, vm.uuid)


@api("RebootVmInstance")
async def reboot_vm(ctx: ApiContext) -> dict[str, Any]:
    vm = await _vm_for(ctx)
    async with ctx.p.queues.serial(vm.uuid):
        vm = await _vm_for(ctx, vm.uuid)
        _need_state(vm, "Running")
        if await _installing_from_iso(ctx.p, vm.uuid):
            await boot_from_disk_after_install(ctx.p, vm)
            return await _vm_inv(ctx, vm.uuid)
        await _set_state(ctx.p, vm.uuid, state="Rebooting")
        try:
            await agent(ctx.p, vm.hostUuid, "/vm/reboot", {"vmUuid": vm.uuid})
        finally:
            await _set_state(ctx.p, vm.uuid, state="Running")
        return await _vm_inv(ctx, vm.uuid)


# Marks a VM created from an ISO whose boot order is still the install default (CdRom first).
ISO_INSTALL_TAG = "bootOrder::installingFromIso"


async def _installing_from_iso(p: Platform, vm_uuid: str) -> bool:
    async with p.db.tx() as s:
        return ISO_INSTALL_TAG in await system_tags(s, vm_uuid)


async def boot_from_disk_after_install(p: Platform, vm: m.VmInstance) -> None:
    """The spec's rule: a VM created from an ISO boots from CdRom until it reboots after the
    install, then from HardDisk. A reset keeps QEMU's boot order, so restart the domain cold."""
    async with p.db.tx() as s:
        await s.execute(
            delete(m.SystemTag).where(m.SystemTag.resourceUuid == vm.uuid, m.SystemTag.tag == ISO_INSTALL_TAG)
        )
        await s.execute(
            update(m.VmInstance).where(m.VmInstance.uuid == vm.uuid).values(bootOrder="HardDisk", state="Rebooting")
        )
    try:
        await agent(p, vm.hostUuid, "/vm/stop", {"vmUuid": vm.uuid, "graceful": False, "timeout": 0})
        await agent(p, vm.hostUuid, "/vm/start", {"vm": asdict(await build_spec(p, vm.uuid))})
    finally:
        await _set_state(p, vm.uuid, state="Running")


async def on_guest_reboot(p: Platform, vm_uuid: str) -> None:
    """The guest reset itself; an ISO install is over when that happens."""
    async with p.queues.serial(vm_uuid):
        async with p.db.tx() as s:
            vm = await s.get(m.VmInstance, vm_uuid)
        if vm is not None and vm.state == "Running" and await _installing_from_iso(p, vm_uuid):
            log.info("VM %s rebooted after installing from its ISO; it boots from its disk now", vm_uuid)
            await boot_from_disk_after_install(p, vm)


@api("UpdateVmInstance")
async def update_vm(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        vm = await load(s, m.VmInstance, ctx.req("uuid"), ctx, "VmInstance", owned=True)
        update_fields(vm, ctx, ("name", "description", "platform"))
        if ctx.str("defaultL3NetworkUuid"):
            nics = set(
                (await s.execute(select(m.VmNic.l3NetworkUuid).where(m.VmNic.vmInstanceUuid == vm.uuid))).scalars()
            )
            if ctx.str("defaultL3NetworkUuid") not in nics:
                raise invalid("defaultL3NetworkUuid must be an L3 network the VM has a NIC on")
            vm.defaultL3NetworkUuid = ctx.str("defaultL3NetworkUuid")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectVmInstanceInventory", vm)}


@api("DestroyVmInstance")
async def destroy_vm(ctx: ApiContext) -> dict[str, Any]:
    p = ctx.p
    vm = await _vm_for(ctx)
    async with p.queues.serial(vm.uuid):
        vm = await _vm_for(ctx, vm.uuid)
        if vm.state == "Destroyed":
            return {}
        if vm.state != "Created":
            _need_state(vm, "Running", "Stopped", "Paused", "Unknown")
        await destroy(p, vm)
        return {}


async def destroy(p: Platform, vm: m.VmInstance) -> None:
    """Destroy the VM by the vm/deletionPolicy. Its host capacity, IPs and NICs are freed at once;
    Direct expunges it too, Delay and Never keep it Destroyed (recoverable) with its root volume.
    A host that cannot be reached does not stop it: the domain's destruction goes to the GC."""
    policy = await p.config.get("vm", "deletionPolicy")
    if vm.hostUuid and vm.state in ("Running", "Paused", "Unknown", "Created"):
        await _set_state(p, vm.uuid, state="Destroying")
        try:
            await gc.call_or_defer(p, gc.DESTROY_VM, vm.hostUuid, "/vm/destroy", {"vmUuid": vm.uuid}, vm.uuid)
        except BaseException:
            await _set_state(p, vm.uuid, state=vm.state)
            raise
        for hook in STOP_HOOKS:
            try:  # the domain is gone: a network service left behind is cleaned on the host's reconnect
                await hook(p, vm.uuid, vm.hostUuid)
            except Exception as err:
                log.warning("VM %s destroyed, but a stop hook failed on host %s: %s", vm.uuid, vm.hostUuid, err)
    async with p.db.tx() as s:
        data = list(
            (
                await s.execute(
                    select(m.Volume.uuid).where(m.Volume.vmInstanceUuid == vm.uuid, m.Volume.type == "Data")
                )
            ).scalars()
        )
        await s.execute(
            update(m.Volume)
            .where(m.Volume.vmInstanceUuid == vm.uuid, m.Volume.type == "Data")
            .values(vmInstanceUuid=None, deviceId=None)
        )
        nics = (
            (await s.execute(select(m.VmNic).where(m.VmNic.vmInstanceUuid == vm.uuid).order_by(m.VmNic.deviceId)))
            .scalars()
            .all()
        )
        saved = [{"l3NetworkUuid": n.l3NetworkUuid, "ip": n.ip, "mac": n.mac, "deviceId": n.deviceId} for n in nics]
        await _release_all(s, vm.uuid, release_volumes=False)
        await s.execute(
            update(m.VmInstance)
            .where(m.VmInstance.uuid == vm.uuid)
            .values(
                state="Destroyed",
                destroyDate=datetime.utcnow(),
                destroyedNics=json.dumps(saved),
                lastHostUuid=vm.hostUuid or vm.lastHostUuid,
            )
        )
    if data and await p.config.get("vm", "dataVolume.deleteOnVmDestroy"):
        from nimbostack.storage.volume import delete_volume

        for vol_uuid in data:
            async with p.queues.serial(vol_uuid):
                await delete_volume(p, vol_uuid)
    if policy == "Direct":
        try:
            await expunge(p, vm.uuid)
        except ApiError as err:  # the VM is Destroyed already; the expunger tries again
            log.warning("VM %s destroyed, but expunging it failed (the expunger retries): %s", vm.uuid, err)


async def expunge(p: Platform, vm_uuid: str) -> None:
    """Remove the VM's root volume file (through the GC if its host is unreachable) and every row
    of it; its data volumes are detached and stay."""
    async with p.db.tx() as s:
        vm = await s.get(m.VmInstance, vm_uuid)
        if vm is None:
            return
        root = await s.get(m.Volume, vm.rootVolumeUuid) if vm.rootVolumeUuid else None
    if root is not None:
        from nimbostack.storage.volume import delete_volume_files

        await delete_volume_files(p, root.uuid, vm.lastHostUuid)
    async with p.db.tx() as s:
        await s.execute(
            update(m.Volume)
            .where(m.Volume.vmInstanceUuid == vm_uuid, m.Volume.type == "Data")
            .values(vmInstanceUuid=None, deviceId=None)
        )
        await _release_all(s, vm_uuid, release_volumes=True)
        row = await s.get(m.VmInstance, vm_uuid)
        if row is not None:
            await s.delete(row)
        await disown(s, [vm_uuid])


@api("ExpungeVmInstance")
async def expunge_vm(ctx: ApiContext) -> dict[str, Any]:
    vm = await _vm_for(ctx)
    async with ctx.p.queues.serial(vm.uuid):
        vm = await _vm_for(ctx, vm.uuid)
        _need_state(vm, "Destroyed")
        await expunge(ctx.p, vm.uuid)
    return {}


async def _expunge_due(p: Platform, cutoff: datetime) -> list[str]:
    async with p.db.tx() as s:
        return list(
            (
                await s.execute(
                    select(m.VmInstance.uuid).where(
                        m.VmInstance.state == "Destroyed", m.VmInstance.destroyDate < cutoff
                    )
                )
            ).scalars()
        )


async def _expunge_one(p: Platform, vm_uuid: str) -> None:
    async with p.queues.serial(vm_uuid):
        async with p.db.tx() as s:
            vm = await s.get(m.VmInstance, vm_uuid)
        if vm is not None and vm.state == "Destroyed":
            await expunge(p, vm_uuid)


expunger.register(expunger.Expungeable("vm", _expunge_due, _expunge_one))


async def _static_ips(s: Any, vm_uuid: str) -> dict[str, str]:
    out = {}
    for tag in await system_tags(s, vm_uuid):
        parts = tag.split("::")
        if len(parts) == 3 and parts[0] == "staticIp":
            out[parts[1]] = parts[2]
    return out


async def _holder(s: Any, l3_uuid: str, ip: str) -> str:
    vm_uuid = (
        await s.execute(select(m.VmNic.vmInstanceUuid).where(m.VmNic.l3NetworkUuid == l3_uuid, m.VmNic.ip == ip))
    ).scalar_one_or_none()
    return f"VM {vm_uuid}" if vm_uuid else "another user of the network"


@api("RecoverVmInstance")
async def recover_vm(ctx: ApiContext) -> dict[str, Any]:
    """Destroyed → Stopped with its root volume; a NIC again on each of its L3 networks. A static
    IP (``staticIp::`` tag) must be free; otherwise the old IP is taken back if free, or a new one."""
    vm = await _vm_for(ctx)
    async with ctx.p.queues.serial(vm.uuid):
        vm = await _vm_for(ctx, vm.uuid)
        _need_state(vm, "Destroyed")
        async with ctx.p.db.tx() as s:
            row = await s.get(m.VmInstance, vm.uuid)
            root = await s.get(m.Volume, row.rootVolumeUuid) if row.rootVolumeUuid else None
            if root is None:
                raise not_allowed(f"VM {vm.uuid} cannot be recovered: its root volume no longer exists")
            if row.destroyedNics:
                saved = json.loads(row.destroyedNics)
            else:  # destroyed before the NICs were kept: its default network
                saved = [{"l3NetworkUuid": row.defaultL3NetworkUuid}] if row.defaultL3NetworkUuid else []
            static = await _static_ips(s, vm.uuid)
            for device_id, old in enumerate(saved):
                l3_uuid = old["l3NetworkUuid"]
                if await s.get(m.L3Network, l3_uuid) is None:
                    raise not_allowed(f"VM {vm.uuid} cannot be recovered: its L3 network {l3_uuid} no longer exists")
                wanted = static.get(l3_uuid)
                if wanted:
                    try:
                        used = await ipam.allocate(s, l3_uuid, wanted)
                    except ApiError as err:
                        if err.code != IP_ALLOCATION_FAILED:
                            raise
                        raise ApiError(
                            IP_ALLOCATION_FAILED,
                            "The VM's IP is taken",
                            f"VM {vm.uuid} cannot be recovered: its static IP {wanted} on L3 network {l3_uuid} "
                            f"is used by {await _holder(s, l3_uuid, wanted)}",
                        ) from None
                else:
                    used = None
                    if old.get("ip"):
                        try:
                            used = await ipam.allocate(s, l3_uuid, old["ip"])
                        except ApiError:
                            used = None  # taken meanwhile, or its range is gone: any free IP will do
                    if used is None:
                        used = await ipam.allocate(s, l3_uuid)
                mac = old.get("mac")
                if not mac or (await s.execute(select(m.VmNic.uuid).where(m.VmNic.mac == mac))).first():
                    mac = _mac()
                s.add(
                    m.VmNic(
                        uuid=new_uuid(),
                        vmInstanceUuid=vm.uuid,
                        l3NetworkUuid=l3_uuid,
                        ip=used.ip,
                        mac=mac,
                        netmask=used.netmask,
                        gateway=used.gateway,
                        deviceId=old.get("deviceId", device_id),
                        usedIpUuid=used.uuid,
                    )
                )
            row.state, row.destroyDate, row.destroyedNics, row.hostUuid = "Stopped", None, None, None
        return await _vm_inv(ctx, vm.uuid)


@api("GetVmConsoleAddress")
async def console_address(ctx: ApiContext) -> dict[str, Any]:
    vm = await _vm_for(ctx)
    _need_state(vm, "Running", "Paused")
    reply = await agent(ctx.p, vm.hostUuid, "/vm/console", {"vmUuid": vm.uuid})
    return {"hostIp": reply["hostIp"], "port": reply["port"], "protocol": reply["protocol"]}


@api("GetVmBootOrder")
async def get_boot_order(ctx: ApiContext) -> dict[str, Any]:
    vm = await _vm_for(ctx)
    return {"orders": vm.bootOrder.split(",")}


@api("SetVmBootOrder")
async def set_boot_order(ctx: ApiContext) -> dict[str, Any]:
    order = ctx.list("bootOrder") or ["HardDisk"]
    bad = [o for o in order if o not in ("HardDisk", "CdRom")]
    if bad or len(set(order)) != len(order):
        raise invalid(f"bootOrder must list HardDisk and/or CdRom once each, got {','.join(map(str, order))}")
    vm = await _vm_for(ctx)
    async with ctx.p.queues.serial(vm.uuid):
        await _set_state(ctx.p, vm.uuid, bootOrder=",".join(order))
        async with ctx.p.db.tx() as s:  # an explicit order ends the ISO-install default
            await s.execute(
                delete(m.SystemTag).where(m.SystemTag.resourceUuid == vm.uuid, m.SystemTag.tag == ISO_INSTALL_TAG)
            )
    return await _vm_inv(ctx, vm.uuid)


@api("AttachIsoToVmInstance")
async def attach_iso(ctx: ApiContext) -> dict[str, Any]:
    vm = await _vm_for(ctx, ctx.req("vmInstanceUuid"))
    async with ctx.p.db.tx() as s:
        iso = await load(s, m.Image, ctx.req("isoUuid"), ctx, "Image")
    if iso.mediaType != "ISO" or iso.status != "Ready":
        raise invalid(f"image {iso.uuid} is a {iso.mediaType} ({iso.status}); AttachIsoToVmInstance needs a Ready ISO")
    async with ctx.p.queues.serial(vm.uuid):
        vm = await _vm_for(ctx, vm.uuid)
        _need_state(vm, "Running", "Stopped")
        if vm.isoUuid and vm.isoUuid != iso.uuid:
            raise not_allowed(f"VM {vm.uuid} already has ISO {vm.isoUuid} attached; detach it first")
        if vm.state == "Running":
            path = await cached_image_path(ctx.p, vm.hostUuid, iso.uuid)
            await agent(ctx.p, vm.hostUuid, "/vm/attach-iso", {"vmUuid": vm.uuid, "isoPath": path})
        # the boot order stays as it is (spec 1.0 §4.5): SetVmBootOrder changes it
        await _set_state(ctx.p, vm.uuid, isoUuid=iso.uuid)
    return await _vm_inv(ctx, vm.uuid)


@api("DetachIsoFromVmInstance")
async def detach_iso(ctx: ApiContext) -> dict[str, Any]:
    vm = await _vm_for(ctx, ctx.req("vmInstanceUuid"))
    async with ctx.p.queues.serial(vm.uuid):
        vm = await _vm_for(ctx, vm.uuid)
        _need_state(vm, "Running", "Stopped")
        if vm.isoUuid is None:
            return await _vm_inv(ctx, vm.uuid)
        if vm.state == "Running":
            await agent(ctx.p, vm.hostUuid, "/vm/detach-iso", {"vmUuid": vm.uuid})
        await _set_state(ctx.p, vm.uuid, isoUuid=None)
    return await _vm_inv(ctx, vm.uuid)
