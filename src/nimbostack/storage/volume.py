"""Data volumes: created NotInstantiated, made real on the VM's host at first attach."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from nimbostack.core import expunger, gc, query
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import invalid, not_allowed
from nimbostack.core.hosts import agent
from nimbostack.core.resources import (
    add_creation_tags,
    change_state,
    disown,
    inv,
    load,
    new_uuid,
    own,
    register_queries,
    update_fields,
    visible_clause,
)
from nimbostack.db import models as m
from nimbostack.storage import backend, primary
from nimbostack.storage.snapshot import drop_snapshots

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

query.register(
    query.QueryTarget(
        "QueryObjectVolumeInventory",
        m.Volume,
        "VolumeInventory",
        scope="owned",
        joins={
            "vmInstance": query.Join("vmInstanceUuid", "QueryObjectVmInstanceInventory", "uuid"),
            "primaryStorage": query.Join("primaryStorageUuid", "QueryObjectPrimaryStorageInventory", "uuid"),
            "diskOffering": query.Join("diskOfferingUuid", "QueryObjectDiskOfferingInventory", "uuid"),
            "image": query.Join("rootImageUuid", "QueryObjectImageInventory", "uuid"),
            "snapshot": query.Join("uuid", "QueryObjectVolumeSnapshotInventory", "volumeUuid"),
            "localStorageHostRef": query.Join("uuid", "QueryObjectLocalStorageResourceRefInventory", "resourceUuid"),
        },
    )
)
register_queries("QueryVolume")

MAX_DATA_VOLUMES = 24


async def _volume(ctx: ApiContext, uuid: str | None = None) -> m.Volume:
    async with ctx.p.db.tx() as s:
        return await load(s, m.Volume, uuid or ctx.req("uuid"), ctx, "Volume", owned=True)


async def _out(ctx: ApiContext, uuid: str) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        return {"inventory": await inv(s, "QueryObjectVolumeInventory", await s.get(m.Volume, uuid))}


@api("CreateDataVolume")
async def create_data_volume(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        offering = await load(s, m.DiskOffering, ctx.req("diskOfferingUuid"), ctx, "DiskOffering")
        if offering.state != "Enabled":
            raise not_allowed(f"disk offering {offering.uuid} is {offering.state}")
        vol = m.Volume(
            uuid=new_uuid(ctx),
            name=ctx.req("name"),
            description=ctx.str("description"),
            diskOfferingUuid=offering.uuid,
            type="Data",
            size=offering.diskSize,
            status="NotInstantiated",
        )
        s.add(vol)
        await own(s, ctx, vol.uuid, "VolumeVO")
        await add_creation_tags(s, ctx, vol.uuid, "VolumeVO")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectVolumeInventory", vol)}


@api("UpdateVolume")
async def update_volume(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        vol = await load(s, m.Volume, ctx.req("uuid"), ctx, "Volume", owned=True)
        update_fields(vol, ctx)
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectVolumeInventory", vol)}


@api("AttachDataVolumeToVm")
async def attach_data_volume(ctx: ApiContext) -> dict[str, Any]:
    p = ctx.p
    vol = await _volume(ctx, ctx.req("volumeUuid"))
    async with p.db.tx() as s:
        vm = await load(s, m.VmInstance, ctx.req("vmInstanceUuid"), ctx, "VmInstance", owned=True)
    async with p.queues.serial(vm.uuid), p.queues.serial(vol.uuid):
        async with p.db.tx() as s:
            vol = await load(s, m.Volume, vol.uuid, ctx)
            vm = await load(s, m.VmInstance, vm.uuid, ctx)
            if vol.type != "Data":
                raise not_allowed(f"volume {vol.uuid} is a {vol.type} volume; only data volumes attach")
            if vol.vmInstanceUuid:
                raise not_allowed(f"volume {vol.uuid} is already attached to VM {vol.vmInstanceUuid}")
            if vol.status not in ("Ready", "NotInstantiated") or vol.state != "Enabled":
                raise not_allowed(f"volume {vol.uuid} is {vol.state}/{vol.status}")
            if vm.state not in ("Running", "Stopped"):
                raise not_allowed(f"VM {vm.uuid} is {vm.state}; attach needs it Running or Stopped")
            root = await s.get(m.Volume, vm.rootVolumeUuid)
            where = vm.hostUuid or (root.hostUuid if root else None)
            if vol.hostUuid and where and vol.hostUuid != where:
                raise not_allowed(
                    f"volume {vol.uuid} lives on host {vol.hostUuid}'s local storage and VM {vm.uuid} "
                    f"on host {where}; migrate the volume first (LocalStorageMigrateVolume)"
                )
            used = set((await s.execute(select(m.Volume.deviceId).where(m.Volume.vmInstanceUuid == vm.uuid))).scalars())
            device_id = next(i for i in range(1, MAX_DATA_VOLUMES + 2) if i not in used)
            if device_id > MAX_DATA_VOLUMES:
                raise not_allowed(f"VM {vm.uuid} already has {MAX_DATA_VOLUMES} data volumes")
            instantiate = vol.status == "NotInstantiated"
            if instantiate:
                assert root is not None
                ps = await primary.reserve(
                    s, vm.clusterUuid or "", where, vol.size, vol.uuid, "VolumeVO", root.primaryStorageUuid
                )
                vol.primaryStorageUuid, vol.hostUuid = ps.uuid, primary.placement(ps, where)
                vol.installPath = primary.install_path(ps, ctx.caller.account_uuid, vol.uuid, "Data")
                vol.status = "Creating"
            ps = await s.get(m.PrimaryStorage, vol.primaryStorageUuid)
            ps_path = ps.url
            # the agent that makes the file: the volume's host (local storage), else the VM's
            file_host = await primary.file_host(s, ps, vol.hostUuid, where or vm.lastHostUuid)
        try:
            if instantiate:
                if file_host is None:
                    raise not_allowed(f"no host reaches primary storage {ps.uuid} to make volume {vol.uuid}")
                await agent(
                    p,
                    file_host,
                    primary.command(ps, "create-empty"),
                    {"path": ps_path, "installPath": vol.installPath, "size": vol.size},
                )
            if vm.state == "Running":
                cache = await p.config.get("kvm", "vm.cacheMode")
                async with p.db.tx() as s:
                    disk = await primary.disk_source(s, vol, cache, device_id)
                await agent(p, vm.hostUuid, "/vm/attach-disk", {"vmUuid": vm.uuid, "disk": disk.__dict__})
        except BaseException:
            async with p.db.tx() as s:
                row = await s.get(m.Volume, vol.uuid)
                if instantiate:
                    await primary.release(s, vol.uuid)
                    row.status, row.primaryStorageUuid, row.hostUuid, row.installPath = (
                        "NotInstantiated",
                        None,
                        None,
                        None,
                    )
            if instantiate and file_host:
                await gc.call_or_defer(p, gc.DELETE_VOLUME_FILE, file_host, primary.command(ps, "delete"),
                                       {"path": ps_path, "installPath": vol.installPath})
            raise
        async with p.db.tx() as s:
            row = await s.get(m.Volume, vol.uuid)
            row.status, row.vmInstanceUuid, row.deviceId = "Ready", vm.uuid, device_id
    return await _out(ctx, vol.uuid)


@api("DetachDataVolumeFromVm")
async def detach_data_volume(ctx: ApiContext) -> dict[str, Any]:
    p = ctx.p
    vol = await _volume(ctx)
    if not vol.vmInstanceUuid:
        raise not_allowed(f"volume {vol.uuid} is not attached to a VM")
    if vol.type != "Data":
        raise not_allowed(f"volume {vol.uuid} is a root volume; it cannot be detached")
    async with p.queues.serial(vol.vmInstanceUuid), p.queues.serial(vol.uuid):
        async with p.db.tx() as s:
            vm = await s.get(m.VmInstance, vol.vmInstanceUuid)
        if vm is not None and vm.state not in ("Running", "Stopped"):
            raise not_allowed(f"VM {vm.uuid} is {vm.state}; detach needs it Running or Stopped")
        if vm is not None and vm.state == "Running":
            async with p.db.tx() as s:
                disk = await primary.disk_source(s, vol)
            await agent(p, vm.hostUuid, "/vm/detach-disk", {"vmUuid": vm.uuid, "disk": disk.__dict__})
        async with p.db.tx() as s:
            row = await s.get(m.Volume, vol.uuid)
            row.vmInstanceUuid, row.deviceId = None, None
    return await _out(ctx, vol.uuid)


async def delete_volume_files(p: Platform, vol_uuid: str, preferred_host: str | None = None) -> None:
    """Remove the volume's file and its snapshots' files (through the GC where the host is
    unreachable); the snapshots' rows and capacity go with them. The volume's row stays."""
    async with p.db.tx() as s:
        vol = await s.get(m.Volume, vol_uuid)
        if vol is None:
            return
        ps = await s.get(m.PrimaryStorage, vol.primaryStorageUuid) if vol.primaryStorageUuid else None
        host = await primary.file_host(s, ps, vol.hostUuid, preferred_host) if ps is not None else None
    if ps is None or host is None:
        return
    if vol.installPath:
        await gc.call_or_defer(
            p, gc.DELETE_VOLUME_FILE, host, primary.command(ps, "delete"),
            {"path": ps.url, "installPath": vol.installPath}, vol.uuid,
        )
    await drop_snapshots(p, vol_uuid, host, ps)


async def expunge_volume(p: Platform, vol_uuid: str) -> None:
    """Remove the volume's file and snapshots (through the GC if its host is unreachable), give
    its primary storage capacity back and drop its row."""
    async with p.db.tx() as s:
        vol = await s.get(m.Volume, vol_uuid)
        if vol is None:
            return
    await delete_volume_files(p, vol_uuid)
    async with p.db.tx() as s:
        await primary.release(s, vol.uuid)
        row = await s.get(m.Volume, vol.uuid)
        if row is not None:
            await s.delete(row)
        await disown(s, [vol.uuid])


async def delete_volume(p: Platform, vol_uuid: str) -> None:
    """Delete a detached data volume by volume/deletionPolicy: Direct expunges it, Delay and
    Never mark it Deleted (its file and capacity kept, RecoverDataVolume brings it back)."""
    async with p.db.tx() as s:
        row = await s.get(m.Volume, vol_uuid)
        if row is None or row.status == "Deleted":
            return
        if await p.config.get("volume", "deletionPolicy") != "Direct":
            row.status, row.deleteDate = "Deleted", datetime.utcnow()
            return
    await expunge_volume(p, vol_uuid)


@api("DeleteDataVolume")
async def delete_data_volume(ctx: ApiContext) -> dict[str, Any]:
    vol = await _volume(ctx)
    if vol.type != "Data":
        raise invalid(f"volume {vol.uuid} is a root volume; destroy its VM instead")
    async with ctx.p.queues.serial(vol.uuid):
        vol = await _volume(ctx, vol.uuid)
        if vol.vmInstanceUuid:
            raise not_allowed(f"volume {vol.uuid} is attached to VM {vol.vmInstanceUuid}; detach it first")
        await delete_volume(ctx.p, vol.uuid)
    return {}


@api("ExpungeDataVolume")
async def expunge_data_volume(ctx: ApiContext) -> dict[str, Any]:
    vol = await _volume(ctx)
    async with ctx.p.queues.serial(vol.uuid):
        vol = await _volume(ctx, vol.uuid)
        if vol.status != "Deleted":
            raise not_allowed(f"volume {vol.uuid} is {vol.status}; only a Deleted volume is expunged")
        await expunge_volume(ctx.p, vol.uuid)
    return {}


@api("RecoverDataVolume")
async def recover_data_volume(ctx: ApiContext) -> dict[str, Any]:
    vol = await _volume(ctx)
    if vol.type != "Data":
        raise not_allowed(f"volume {vol.uuid} is a root volume; it is recovered with its VM (RecoverVmInstance)")
    async with ctx.p.queues.serial(vol.uuid):
        async with ctx.p.db.tx() as s:
            row = await load(s, m.Volume, vol.uuid, ctx)
            if row.status != "Deleted":
                raise not_allowed(f"volume {vol.uuid} is {row.status}; only a Deleted volume is recovered")
            row.status, row.deleteDate = ("Ready" if row.installPath else "NotInstantiated"), None
    return await _out(ctx, vol.uuid)


async def _expunge_due(p: Platform, cutoff: datetime) -> list[str]:
    async with p.db.tx() as s:
        return list(
            (
                await s.execute(
                    select(m.Volume.uuid).where(
                        m.Volume.type == "Data", m.Volume.status == "Deleted", m.Volume.deleteDate < cutoff
                    )
                )
            ).scalars()
        )


async def _expunge_one(p: Platform, vol_uuid: str) -> None:
    async with p.queues.serial(vol_uuid):
        async with p.db.tx() as s:
            vol = await s.get(m.Volume, vol_uuid)
        if vol is not None and vol.status == "Deleted":
            await expunge_volume(p, vol_uuid)


expunger.register(expunger.Expungeable("volume", _expunge_due, _expunge_one))


# --- which volumes and VMs go together, and what a volume is ------------------------------------

# the VM states in which a data volume attaches (AttachDataVolumeToVm)
ATTACH_STATES = ("Running", "Stopped")


def _attachable_volumes(vm: m.VmInstance, root: m.Volume | None) -> list[Any]:
    """The WHERE of the data volumes AttachDataVolumeToVm accepts for ``vm``: detached, Enabled,
    Ready or not made yet; a made one on the VM's host (local storage) or on a primary storage
    the VM's cluster reaches."""
    where_vm = vm.hostUuid or (root.hostUuid if root else None)
    reached = select(m.PrimaryStorageClusterRef.primaryStorageUuid).where(
        m.PrimaryStorageClusterRef.clusterUuid == vm.clusterUuid
    )
    made_here = (m.Volume.status == "Ready") & m.Volume.primaryStorageUuid.in_(reached)
    if where_vm:
        made_here &= m.Volume.hostUuid.is_(None) | (m.Volume.hostUuid == where_vm)
    return [
        m.Volume.type == "Data",
        m.Volume.vmInstanceUuid.is_(None),
        m.Volume.state == "Enabled",
        (m.Volume.status == "NotInstantiated") | made_here,
    ]


async def _data_volumes(s: Any, vm_uuid: str) -> int:
    return len((await s.execute(select(m.Volume.uuid).where(
        m.Volume.vmInstanceUuid == vm_uuid, m.Volume.type == "Data"))).all())


@api("GetVmAttachableDataVolume")
async def vm_attachable_volumes(ctx: ApiContext) -> dict[str, Any]:
    """The caller's data volumes AttachDataVolumeToVm would attach to the VM now."""
    async with ctx.p.db.tx() as s:
        vm = await load(s, m.VmInstance, ctx.req("vmInstanceUuid"), ctx, "VmInstance", owned=True)
        if vm.state not in ATTACH_STATES or await _data_volumes(s, vm.uuid) >= MAX_DATA_VOLUMES:
            return {"inventories": []}
        root = await s.get(m.Volume, vm.rootVolumeUuid) if vm.rootVolumeUuid else None
        rows = (
            await s.execute(
                select(m.Volume)
                .where(*_attachable_volumes(vm, root), *visible_clause(ctx.caller, m.Volume.uuid, owned=True))
                .order_by(m.Volume.createDate)
            )
        ).scalars().all()
        return {"inventories": [await inv(s, "QueryObjectVolumeInventory", r) for r in rows]}


@api("GetDataVolumeAttachableVm")
async def volume_attachable_vms(ctx: ApiContext) -> dict[str, Any]:
    """The caller's VMs the data volume would attach to now (AttachDataVolumeToVm)."""
    async with ctx.p.db.tx() as s:
        vol = await load(s, m.Volume, ctx.req("volumeUuid"), ctx, "Volume", owned=True)
        vms = (
            await s.execute(
                select(m.VmInstance)
                .where(
                    m.VmInstance.type == "UserVm",
                    m.VmInstance.state.in_(ATTACH_STATES),
                    *visible_clause(ctx.caller, m.VmInstance.uuid, owned=True),
                )
                .order_by(m.VmInstance.createDate)
            )
        ).scalars().all()
        out = []
        for vm in vms:
            root = await s.get(m.Volume, vm.rootVolumeUuid) if vm.rootVolumeUuid else None
            fits = select(m.Volume.uuid).where(m.Volume.uuid == vol.uuid, *_attachable_volumes(vm, root))
            if (await s.execute(fits)).first() and await _data_volumes(s, vm.uuid) < MAX_DATA_VOLUMES:
                out.append(await inv(s, "QueryObjectVmInstanceInventory", vm))
        return {"inventories": out}


@api("ChangeVolumeState")
async def change_volume_state(ctx: ApiContext) -> dict[str, Any]:
    """A Disabled volume is not attached to a VM (nor offered for it) until enabled again."""
    return await change_state(ctx, m.Volume, "Volume", "QueryObjectVolumeInventory")


@api("GetVolumeFormat")
async def volume_formats(ctx: ApiContext) -> dict[str, Any]:
    """The file formats of volumes: what the agents' qemu-img makes (qcow2) and takes (raw too)."""
    return {
        "formats": [
            {"format": fmt, "masterHypervisorType": "KVM", "supportingHypervisorTypes": ["KVM", "Simulator"]}
            for fmt in VOLUME_FORMATS
        ]
    }


VOLUME_FORMATS = ("qcow2", "raw")


@api("GetVolumeCapabilities")
async def volume_capabilities(ctx: ApiContext) -> dict[str, Any]:
    """MigrationInCurrentPrimaryStorage: a volume on a host's local storage moves to another host
    of it (LocalStorageMigrateVolume); moving to another primary storage is not built."""
    vol = await _volume(ctx)
    async with ctx.p.db.tx() as s:
        ps = await s.get(m.PrimaryStorage, vol.primaryStorageUuid) if vol.primaryStorageUuid else None
    bound = ps is not None and backend.of(ps).host_bound
    return {"capabilities": {"MigrationInCurrentPrimaryStorage": bound, "MigrationToOtherPrimaryStorage": False}}


@api("SyncVolumeSize")
async def sync_volume_size(ctx: ApiContext) -> dict[str, Any]:
    """The volume's file's size on disk (actualSize), and its virtual size when the agent reads
    one, as its host's agent finds them now."""
    p = ctx.p
    vol = await _volume(ctx)
    async with p.queues.serial(vol.uuid):
        async with p.db.tx() as s:
            vol = await load(s, m.Volume, vol.uuid, ctx)
            ps = await s.get(m.PrimaryStorage, vol.primaryStorageUuid) if vol.primaryStorageUuid else None
            host = await primary.file_host(s, ps, vol.hostUuid) if ps is not None and vol.installPath else None
        if ps is None or host is None:
            raise not_allowed(f"volume {vol.uuid} is {vol.status}: it has no file on a host to measure")
        found = await agent(p, host, primary.command(ps, "info"), {"path": ps.url, "installPath": vol.installPath})
        if not found.get("exists"):
            raise not_allowed(f"volume {vol.uuid}'s file {vol.installPath} is not on host {host}")
        async with p.db.tx() as s:
            row = await s.get(m.Volume, vol.uuid)
            row.actualSize = int(found.get("actualSize") or 0)
            if found.get("virtualSize"):
                row.size = int(found["virtualSize"])
    return await _out(ctx, vol.uuid)
