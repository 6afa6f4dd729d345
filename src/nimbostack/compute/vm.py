"""VM instances: their inventory and queries, the shared helpers of VM operations, and the creation flow."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, select, update

from nimbostack.compute.allocator import candidate_hosts, new_mac, release_all, take_host
from nimbostack.compute.vmspec import ISO_INSTALL_TAG, VOLUMES_OF_VM, VOLUMES_OF_VMS, build_spec, image_source
from nimbostack.core import deadline, gc, hooks, query
from nimbostack.core.auth import Caller
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import invalid, not_allowed
from nimbostack.core.flow import FlowChain, until_stored
from nimbostack.core.hosts import agent
from nimbostack.core.resources import (
    add_tags,
    disown,
    inv,
    load,
    load_row,
    new_uuid,
    own_all,
    register_queries,
    wanted_uuid,
)
from nimbostack.core.tags import system_tags
from nimbostack.db import models as m
from nimbostack.db.engine import Tx, columns, insert_now, table_of
from nimbostack.network import ipam
from nimbostack.storage import primary

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)


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
_NICS = select(*columns(m.VmNic)).order_by(m.VmNic.deviceId)
_NICS_OF_VMS = _NICS.where(m.VmNic.vmInstanceUuid.in_(bindparam("vms", expanding=True)))
# one VM's: an IN list of one is rendered anew at every execution (db/engine.py in_values)
_NICS_OF_VM = _NICS.where(m.VmNic.vmInstanceUuid == bindparam("vm"))


async def _vm_extra(s: Tx, rows: Sequence[Any], invs: list[dict[str, Any]]) -> None:
    uuids = [r.uuid for r in rows]
    one = len(uuids) == 1
    nics: dict[str, list[dict[str, Any]]] = {}
    found = await (s.execute(_NICS_OF_VM, {"vm": uuids[0]}) if one else s.execute(_NICS_OF_VMS, {"vms": uuids}))
    for nic in found:
        nics.setdefault(nic.vmInstanceUuid, []).append(query.plain(nic, _NIC_FIELDS))
    vols: dict[str, list[dict[str, Any]]] = {}
    vol_rows = (
        await (s.execute(VOLUMES_OF_VM, {"vm": uuids[0]}) if one else s.execute(VOLUMES_OF_VMS, {"vms": uuids}))
    ).all()
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


@dataclass(frozen=True)
class NewVm:
    """A VM to make: what CreateVmInstance asks for, or what an appliance (a virtual router) needs
    for itself, on behalf of ``caller``, who owns the VM and its volumes."""

    caller: Caller
    name: str
    instance_offering_uuid: str
    image_uuid: str
    l3_network_uuids: list[str]
    default_l3_network_uuid: str | None = None
    description: str | None = None
    type: str = "UserVm"
    root_disk_offering_uuid: str | None = None
    data_disk_offering_uuids: list[str] = field(default_factory=list)
    zone_uuid: str | None = None
    cluster_uuid: str | None = None
    host_uuid: str | None = None
    system_tags: list[str] = field(default_factory=list)
    user_tags: list[str] = field(default_factory=list)
    resource_uuid: str | None = None  # the client's: a retry of the same creation names it again
    uuid: str | None = None  # the VM's uuid when the caller decided it (the dispatcher, for the job)


@api("CreateVmInstance")
async def create_vm(ctx: ApiContext) -> dict[str, Any]:
    new = NewVm(
        caller=ctx.caller,
        name=ctx.req("name"),
        instance_offering_uuid=ctx.req("instanceOfferingUuid"),
        image_uuid=ctx.req("imageUuid"),
        l3_network_uuids=[str(u) for u in ctx.list("l3NetworkUuids")],
        default_l3_network_uuid=ctx.str("defaultL3NetworkUuid"),
        description=ctx.str("description"),
        type=ctx.str("type", "UserVm") or "UserVm",
        root_disk_offering_uuid=ctx.str("rootDiskOfferingUuid"),
        data_disk_offering_uuids=[str(u) for u in ctx.list("dataDiskOfferingUuids")],
        zone_uuid=ctx.str("zoneUuid"),
        cluster_uuid=ctx.str("clusterUuid"),
        host_uuid=ctx.str("hostUuid"),
        system_tags=[str(t) for t in ctx.list("systemTags")],
        user_tags=ctx.list("userTags"),
        resource_uuid=ctx.str("resourceUuid"),
        uuid=ctx.resource_uuid,
    )
    return {"inventory": await create_vm_instance(ctx.p, new)}


async def create_vm_instance(p: Platform, new: NewVm) -> dict[str, Any]:
    """Make the VM, its volumes and NICs, and start it; its inventory once Running. On any failure
    every step is undone (host capacity, storage, IPs, volume files, the domain, what the VM start
    extensions put on the host) and the error is raised."""
    l3_uuids = new.l3_network_uuids
    if not l3_uuids:
        raise invalid("l3NetworkUuids must name at least one L3 network")
    if len(set(l3_uuids)) != len(l3_uuids):
        raise invalid("l3NetworkUuids names one L3 network twice")
    default_l3 = new.default_l3_network_uuid or l3_uuids[0]
    if default_l3 not in l3_uuids:
        raise invalid(f"defaultL3NetworkUuid {default_l3} is not one of l3NetworkUuids")
    vm_uuid = wanted_uuid(new.resource_uuid) if new.resource_uuid else (new.uuid or wanted_uuid(None))
    # the whole creation holds the VM's queue: a retry with the same resourceUuid waits for it
    async with p.queues.serial(vm_uuid):
        made = await _made_before(p, new, vm_uuid) if new.resource_uuid else None
        return made if made is not None else await _create(p, new, vm_uuid, default_l3)


async def _disk_size(s: Tx, new: NewVm, offering_uuid: str) -> int:
    offering = await load_row(s, m.DiskOffering, offering_uuid, new, "DiskOffering")
    if offering.state != "Enabled":
        raise not_allowed(f"disk offering {offering.uuid} is {offering.state}")
    return int(offering.diskSize)


async def _create(p: Platform, new: NewVm, vm_uuid: str, default_l3: str) -> dict[str, Any]:
    l3_uuids = new.l3_network_uuids
    static_ips = {t.split("::")[1]: t.split("::")[2] for t in new.system_tags if t.startswith("staticIp::")}
    # what later steps need of the first one's reads
    vm: m.VmInstance
    image: Any

    async def allocate(c: dict[str, Any]) -> None:
        """The VM's row, its host, storage, volumes and IPs in one transaction: all taken, or
        none (and no VM row is left to forget)."""
        nonlocal vm, image
        async with p.db.tx() as s:
            # read only: rows (db/engine.py)
            offering = await load_row(s, m.InstanceOffering, new.instance_offering_uuid, new, "InstanceOffering")
            if offering.state != "Enabled":
                raise not_allowed(f"instance offering {offering.uuid} is {offering.state}")
            image = await load_row(s, m.Image, new.image_uuid, new, "Image")
            if image.status != "Ready" or image.state != "Enabled":
                raise not_allowed(f"image {image.uuid} is {image.state}/{image.status}; it must be Enabled and Ready")
            root_size = image.size
            if image.mediaType == "ISO":
                if not new.root_disk_offering_uuid:
                    raise invalid("a VM created from an ISO needs rootDiskOfferingUuid for its empty root volume")
                root_size = await _disk_size(s, new, new.root_disk_offering_uuid)
            data_sizes = [await _disk_size(s, new, u) for u in new.data_disk_offering_uuids]
            for u in l3_uuids:
                l3 = await load_row(s, m.L3Network, u, new, "L3Network")
                if l3.state != "Enabled":
                    raise not_allowed(f"L3 network {u} is {l3.state}")
            vm = m.VmInstance(
                uuid=vm_uuid,
                name=new.name,
                description=new.description,
                imageUuid=image.uuid,
                instanceOfferingUuid=offering.uuid,
                platform=image.platform,
                defaultL3NetworkUuid=default_l3,
                type=new.type,
                memorySize=offering.memorySize,
                cpuNum=offering.cpuNum,
                cpuSpeed=offering.cpuSpeed,
                allocatorStrategy=offering.allocatorStrategy,
                state="Created",
                bootOrder="CdRom,HardDisk" if image.mediaType == "ISO" else "HardDisk",
                isoUuid=image.uuid if image.mediaType == "ISO" else None,
            )
            await insert_now(s, vm)
            await add_tags(s, vm.uuid, "VmInstanceVO", new.system_tags, new.user_tags)
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
            cpu = vm.cpuNum * vm.cpuSpeed
            hosts = await candidate_hosts(
                s, cpu, vm.memorySize, l3_uuids, new.zone_uuid, new.cluster_uuid, new.host_uuid
            )
            chosen = c["host"] = await take_host(s, hosts, cpu, vm.memorySize)
            placed: dict[str, Any] = {
                "vm": vm.uuid,
                "host": chosen.uuid,
                "cluster": chosen.clusterUuid,
                "zone": chosen.zoneUuid,
                "hypervisor": chosen.hypervisorType,
            }
            sizes = [("Root", root_size, None)] + [
                ("Data", size, u) for size, u in zip(data_sizes, new.data_disk_offering_uuids, strict=True)
            ]
            vols = []
            owned = [(vm.uuid, "VmInstanceVO")]
            storages: dict[str, Any] = {}  # the volumes' primary storages, as reserve read them
            for device_id, (vtype, size, offering_uuid) in enumerate(sizes):
                vol_uuid = new_uuid()
                ps = await primary.reserve(s, chosen.clusterUuid, chosen.uuid, size, vol_uuid, "VolumeVO")
                ps_uuid = ps.uuid
                storages[ps_uuid] = ps
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
                    installPath=primary.install_path(ps, new.caller.account_uuid, vol_uuid, vtype),
                )
                await insert_now(s, vol)
                owned.append((vol_uuid, "VolumeVO"))
                vols.append(vol)
                if vtype == "Root":
                    placed["root"] = vol_uuid
            await own_all(s, new, owned)
            await s.execute(_PLACE_VM, placed)
            c["volumes"] = [(v.installPath, v.size, v.type, v.primaryStorageUuid) for v in vols]
            c["ps"] = storages
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
                        mac=new_mac(),
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
            await release_all(s, vm_uuid, release_volumes=True)

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
            await s.execute(_VM_STARTING, {"vm": vm_uuid})
            await s.execute(_VOLUMES_READY, {"vm": vm_uuid})
        host, url = c["host"].uuid, c["host"].agentUrl
        carried = await hooks.before_start(p, vm_uuid, host, url, defer=True)
        await hooks.start_vm(p, host, asdict(await build_spec(p, vm_uuid)), carried, url)

    async def unstart(c: dict[str, Any]) -> None:
        await gc.call_or_defer(p, gc.DESTROY_VM, c["host"].uuid, "/vm/destroy", {"vmUuid": vm_uuid}, vm_uuid)
        # what before_start put on the host (DHCP entry, EIP rule), whether or not the domain ran
        await hooks.release(p, vm_uuid, c["host"].uuid)

    async def running(c: dict[str, Any]) -> None:
        # a step of its own: a write refused here (a full disk) rolls back the running VM as well,
        # rather than leaving it Starting with its host's capacity taken
        async with p.db.tx() as s:
            row = (await s.execute(_VM_RUNNING, {"vm": vm_uuid, "host": c["host"].uuid})).one()
            c["inventory"] = await inv(s, "QueryObjectVmInstanceInventory", row)

    chain = (
        FlowChain("create-vm")
        .then("allocate", allocate, deallocate)
        .then("create-volumes", create_volumes, delete_volumes)
        .then("start", start, unstart)
        .then("running", running)
    )
    async def forget() -> None:
        async with p.db.tx() as s:
            row = await s.get(m.VmInstance, vm_uuid)
            if row is not None:
                await s.delete(row)
            await disown(s, [vm_uuid])

    try:
        c = await chain.run({})
    except BaseException:
        with deadline.grace():  # the API's own may be spent by now
            await until_stored(forget)
        raise
    inventory: dict[str, Any] = c["inventory"]
    return inventory


async def _made_before(p: Platform, new: NewVm, uuid: str) -> dict[str, Any] | None:
    """A retry of a create whose answer was lost names the same ``resourceUuid`` (ZStack's client
    token): it gets the VM the first call made (that call is done: it held the VM's queue) rather
    than a second VM; None when there is none (the first call failed and was rolled back)."""
    async with p.db.tx() as s:
        row = await s.get(m.VmInstance, uuid)
        if row is None:
            return None
        owner = await load(s, m.VmInstance, uuid, new, "VmInstance", owned=True)
        if owner.name != new.name or owner.imageUuid != new.image_uuid:
            raise not_allowed(f"resourceUuid {uuid} names VM {owner.name} made by another request")
        return await inv(s, "QueryObjectVmInstanceInventory", row)


# The create's writes to its VM and volumes: UPDATEs of the tables, one statement each rather than
# a read of the row and its write. Nothing is loaded to keep in step: each transaction is new.
VM = table_of(m.VmInstance)
VOLUME = table_of(m.Volume)
_PLACE_VM = (
    update(VM)
    .where(VM.c.uuid == bindparam("vm"))
    .values(
        hostUuid=bindparam("host"),
        clusterUuid=bindparam("cluster"),
        zoneUuid=bindparam("zone"),
        hypervisorType=bindparam("hypervisor"),
        rootVolumeUuid=bindparam("root"),
    )
)
_VM_STARTING = update(VM).where(VM.c.uuid == bindparam("vm")).values(state="Starting")
# and the row as the UPDATE left it, for the answer's inventory: one statement, not a second to read it
_VM_RUNNING = (
    update(VM)
    .where(VM.c.uuid == bindparam("vm"))
    .values(state="Running", lastHostUuid=bindparam("host"))
    .returning(*VM.c)
)
_VOLUMES_READY = update(VOLUME).where(VOLUME.c.vmInstanceUuid == bindparam("vm")).values(status="Ready")


async def vm_for(ctx: ApiContext, uuid: str | None = None) -> m.VmInstance:
    async with ctx.p.db.tx() as s:
        return await load(s, m.VmInstance, uuid or ctx.req("uuid"), ctx, "VmInstance", owned=True)


def need_state(vm: m.VmInstance, *states: str) -> None:
    if vm.state not in states:
        raise not_allowed(f"VM {vm.uuid} is {vm.state}; this operation needs it {' or '.join(states)}")


async def set_state(platform: Platform, vm_uuid: str, **values: Any) -> None:
    async with platform.db.tx() as s:
        await s.execute(update(m.VmInstance).where(m.VmInstance.uuid == vm_uuid).values(**values))


async def vm_inv(ctx: ApiContext, vm_uuid: str) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        return {"inventory": await inv(s, "QueryObjectVmInstanceInventory", await s.get(m.VmInstance, vm_uuid))}


STATIC_IP_PREFIX = "staticIp::"


async def static_ips(s: Tx, vm_uuid: str) -> dict[str, str]:
    """{L3 network: IP} of the VM's ``staticIp::{l3}::{ip}`` tags."""
    out = {}
    for tag in await system_tags(s, vm_uuid):
        parts = tag.split("::")
        if len(parts) == 3 and f"{parts[0]}::" == STATIC_IP_PREFIX:
            out[parts[1]] = parts[2]
    return out
