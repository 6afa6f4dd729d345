"""Volume snapshots on primary storages kept as qcow2 files (LocalStorage, SharedMountPoint).

A snapshot is external: the volume's current file is frozen and becomes the snapshot
(``primaryStorageInstallPath``), and the volume continues in a new, empty qcow2 file backed by
it (``Volume.installPath`` changes). That works for a running VM too: libvirt switches the
disk to the new file live (a disk-only external snapshot), so nothing is paused or copied.

* ``latest``: the snapshot the volume's current file is backed by (none after all were deleted).
  A new snapshot's parent is the latest one; snapshots of one volume form one tree.
* Revert (the volume's VM stopped, or the volume detached): a new empty file on top of the
  snapshot becomes the volume; the file written since is deleted. Later snapshots stay (a branch).
* Delete removes the snapshot and its descendants. When the volume's current file depends on it,
  the data of the deleted part of its chain is first merged into that file (``qemu-img rebase``),
  so the volume keeps its content; that needs the VM stopped.
* Capacity: a snapshot holds its file's actual size on the volume's storage (and host).

Migrating a volume on LocalStorage (storage/local_migration.py) moves its snapshots along."""

from __future__ import annotations

import posixpath
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, update

from nimbostack.core import gc, query
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import ApiError, not_allowed
from nimbostack.core.hosts import agent
from nimbostack.core.resources import disown, inv, load, new_uuid, own, register_queries, update_fields
from nimbostack.db import models as m
from nimbostack.storage import backend, primary
from nimbostack.wire import DiskSpec

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

query.register(
    query.QueryTarget(
        "QueryObjectVolumeSnapshotInventory",
        m.VolumeSnapshot,
        scope="owned",
        joins={
            "volume": query.Join("volumeUuid", "QueryObjectVolumeInventory", "uuid"),
            "primaryStorage": query.Join("primaryStorageUuid", "QueryObjectPrimaryStorageInventory", "uuid"),
            "tree": query.Join("treeUuid", "QueryObjectVolumeSnapshotTreeInventory", "uuid"),
            "localStorageHostRef": query.Join("uuid", "QueryObjectLocalStorageResourceRefInventory", "resourceUuid"),
        },
    )
)
query.register(
    query.QueryTarget(
        "QueryObjectVolumeSnapshotTreeInventory",
        m.VolumeSnapshotTree,
        scope="owned",
        owner_column="volumeUuid",
        joins={
            "volume": query.Join("volumeUuid", "QueryObjectVolumeInventory", "uuid"),
            "snapshot": query.Join("uuid", "QueryObjectVolumeSnapshotInventory", "treeUuid"),
        },
    )
)
register_queries("QueryVolumeSnapshot", "QueryVolumeSnapshotTree")


async def _out(ctx: ApiContext, uuid: str) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        return {"inventory": await inv(s, "QueryObjectVolumeSnapshotInventory", await s.get(m.VolumeSnapshot, uuid))}


async def snapshots_of(s: Any, vol_uuid: str) -> list[m.VolumeSnapshot]:
    return list(
        (
            await s.execute(
                select(m.VolumeSnapshot)
                .where(m.VolumeSnapshot.volumeUuid == vol_uuid)
                .order_by(m.VolumeSnapshot.createDate, m.VolumeSnapshot.uuid)
            )
        ).scalars()
    )


def _chain(snaps: list[m.VolumeSnapshot]) -> list[str]:
    """Uuids of the latest snapshot and its ancestors: what the volume's current file depends on."""
    by = {x.uuid: x for x in snaps}
    cur = next((x for x in snaps if x.latest), None)
    out: list[str] = []
    while cur is not None and cur.uuid not in out:
        out.append(cur.uuid)
        cur = by.get(cur.parentUuid or "")
    return out


def _subtree(snaps: list[m.VolumeSnapshot], root_uuid: str) -> list[m.VolumeSnapshot]:
    """The snapshot and its descendants, children after their parents."""
    out = [x for x in snaps if x.uuid == root_uuid]
    i = 0
    while i < len(out):
        out += [x for x in snaps if x.parentUuid == out[i].uuid]
        i += 1
    return out


class _Where:
    """Where a volume's files are and who keeps them."""

    def __init__(self, vol: m.Volume, ps: m.PrimaryStorage, vm: m.VmInstance | None, host: str | None) -> None:
        self.vol, self.ps, self.vm, self.host = vol, ps, vm, host

    @property
    def running(self) -> bool:
        return self.vm is not None and self.vm.state == "Running"

    def body(self, **extra: Any) -> dict[str, Any]:
        return {"path": self.ps.url, **extra}

    def command(self, name: str) -> str:
        return primary.command(self.ps, name)


async def _where(s: Any, vol: m.Volume, need_stopped: str | None = None) -> _Where:
    if vol.status != "Ready" or not vol.installPath or not vol.primaryStorageUuid:
        raise not_allowed(f"volume {vol.uuid} is {vol.status}; it must be Ready (a NotInstantiated volume gets its "
                          "file when first attached to a VM)")
    ps = await s.get(m.PrimaryStorage, vol.primaryStorageUuid)
    if ps is None or ps.type not in backend.BACKENDS:
        raise not_allowed(f"volume {vol.uuid}'s primary storage does not keep qcow2 snapshots")
    if vol.format != "qcow2":
        raise not_allowed(f"volume {vol.uuid} is {vol.format}; snapshots need qcow2")
    vm = await s.get(m.VmInstance, vol.vmInstanceUuid) if vol.vmInstanceUuid else None
    if vm is not None and vm.state not in ("Running", "Stopped"):
        raise not_allowed(f"VM {vm.uuid} of volume {vol.uuid} is {vm.state}; it must be Running or Stopped")
    if need_stopped and vm is not None and vm.state != "Stopped":
        raise not_allowed(f"VM {vm.uuid} is {vm.state}; {need_stopped} needs it Stopped")
    preferred = vm.hostUuid if vm is not None and vm.state == "Running" else (vm.lastHostUuid if vm else None)
    host = await primary.file_host(s, ps, vol.hostUuid, preferred)
    if host is None:
        raise not_allowed(f"no host reaches primary storage {ps.uuid} of volume {vol.uuid}")
    return _Where(vol, ps, vm, host)


def _new_file(vol: m.Volume) -> str:
    return posixpath.join(posixpath.dirname(vol.installPath or ""), f"{new_uuid()}.qcow2")


@asynccontextmanager
async def serial(p: Platform, vm_uuid: str | None, vol_uuid: str) -> AsyncIterator[None]:
    """The volume's queue, after its VM's (as attach/detach take them)."""
    async with AsyncExitStack() as stack:
        if vm_uuid and vm_uuid != vol_uuid:
            await stack.enter_async_context(p.queues.serial(vm_uuid))
        await stack.enter_async_context(p.queues.serial(vol_uuid))
        yield


async def _locked(ctx: ApiContext, vol_uuid: str) -> tuple[m.Volume, str | None]:
    async with ctx.p.db.tx() as s:
        vol = await load(s, m.Volume, vol_uuid, ctx, "Volume", owned=True)
        return vol, vol.vmInstanceUuid


@api("CreateVolumeSnapshot")
async def create_snapshot(ctx: ApiContext) -> dict[str, Any]:
    p = ctx.p
    vol, vm_uuid = await _locked(ctx, ctx.req("volumeUuid"))
    async with serial(p, vm_uuid, vol.uuid):
        async with p.db.tx() as s:
            vol = await load(s, m.Volume, vol.uuid, ctx)
            w = await _where(s, vol)
        new = _new_file(vol)
        body = w.body(installPath=vol.installPath, newInstallPath=new)
        if w.running:
            assert w.vm is not None
            disk = DiskSpec(vol.uuid, vol.installPath or "", vol.deviceId or 0, vol.format)
            body.update(vmUuid=w.vm.uuid, disk=disk.__dict__)
        host = w.vm.hostUuid if w.running and w.vm is not None else w.host
        assert host is not None
        try:
            size = int((await agent(p, host, w.command("snapshot"), body))["size"])
        except ApiError:
            # the switch to the new file may have happened with the answer lost: the new file
            # exists only if it did (libvirt's atomic snapshot and our rename make sure of that)
            info = await agent(p, host, w.command("info"), w.body(installPath=new))
            if not info.get("exists"):
                raise
            size = int((await agent(p, host, w.command("info"), w.body(installPath=vol.installPath)))
                       .get("actualSize") or 0)
        snap_uuid = new_uuid(ctx)
        async with p.db.tx() as s:
            row = await s.get(m.Volume, vol.uuid)
            snaps = await snapshots_of(s, vol.uuid)
            latest = next((x for x in snaps if x.latest), None)
            tree = (
                await s.execute(
                    select(m.VolumeSnapshotTree).where(
                        m.VolumeSnapshotTree.volumeUuid == vol.uuid, m.VolumeSnapshotTree.current.is_(True)
                    )
                )
            ).scalar_one_or_none()
            if tree is None:
                tree = m.VolumeSnapshotTree(uuid=new_uuid(), volumeUuid=vol.uuid, current=True)
                s.add(tree)
            await s.execute(
                update(m.VolumeSnapshot).where(m.VolumeSnapshot.volumeUuid == vol.uuid).values(latest=False)
            )
            snap = m.VolumeSnapshot(
                uuid=snap_uuid,
                name=ctx.req("name"),
                description=ctx.str("description"),
                volumeUuid=vol.uuid,
                treeUuid=tree.uuid,
                parentUuid=latest.uuid if latest is not None else None,
                primaryStorageUuid=w.ps.uuid,
                primaryStorageInstallPath=row.installPath,
                volumeType=row.type,
                format=row.format,
                type="Hypervisor",
                size=size,
                latest=True,
            )
            s.add(snap)
            await own(s, ctx, snap_uuid, "VolumeSnapshotVO")
            row.installPath = new
            await backend.of(w.ps).reserve(s, w.ps, row.hostUuid, size, snap_uuid, "VolumeSnapshotVO", force=True)
    return await _out(ctx, snap_uuid)


async def _snapshot(ctx: ApiContext) -> m.VolumeSnapshot:
    async with ctx.p.db.tx() as s:
        return await load(s, m.VolumeSnapshot, ctx.req("uuid"), ctx, "VolumeSnapshot", owned=True)


@api("UpdateVolumeSnapshot")
async def update_snapshot(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        snap = await load(s, m.VolumeSnapshot, ctx.req("uuid"), ctx, "VolumeSnapshot", owned=True)
        update_fields(snap, ctx)
    return await _out(ctx, snap.uuid)


@api("RevertVolumeFromSnapshot")
async def revert_snapshot(ctx: ApiContext) -> dict[str, Any]:
    p = ctx.p
    snap = await _snapshot(ctx)
    vol, vm_uuid = await _locked(ctx, snap.volumeUuid)
    async with serial(p, vm_uuid, vol.uuid):
        async with p.db.tx() as s:
            vol = await load(s, m.Volume, vol.uuid, ctx)
            snap = await load(s, m.VolumeSnapshot, snap.uuid, ctx)
            w = await _where(s, vol, need_stopped="reverting a volume to a snapshot")
        new = _new_file(vol)
        await agent(p, w.host or "", w.command("overlay"),
                    w.body(backing=snap.primaryStorageInstallPath, installPath=new))
        async with p.db.tx() as s:
            row = await s.get(m.Volume, vol.uuid)
            old, row.installPath = row.installPath, new
            await s.execute(
                update(m.VolumeSnapshot).where(m.VolumeSnapshot.volumeUuid == vol.uuid).values(latest=False)
            )
            await s.execute(update(m.VolumeSnapshot).where(m.VolumeSnapshot.uuid == snap.uuid).values(latest=True))
        # what was written since the snapshot is gone for good
        await gc.call_or_defer(p, gc.DELETE_VOLUME_FILE, w.host or "", w.command("delete"),
                               w.body(installPath=old), vol.uuid)
    return {}


@api("DeleteVolumeSnapshot")
async def delete_snapshot(ctx: ApiContext) -> dict[str, Any]:
    p = ctx.p
    snap = await _snapshot(ctx)
    vol, vm_uuid = await _locked(ctx, snap.volumeUuid)
    async with serial(p, vm_uuid, vol.uuid):
        async with p.db.tx() as s:
            vol = await load(s, m.Volume, vol.uuid, ctx)
            snap = await s.get(m.VolumeSnapshot, snap.uuid)
            if snap is None:
                return {}
            snaps = await snapshots_of(s, vol.uuid)
            doomed = _subtree(snaps, snap.uuid)
            depends = snap.uuid in _chain(snaps)
            w = await _where(s, vol, need_stopped=(
                f"deleting snapshot {snap.uuid}, which volume {vol.uuid}'s current file depends on,"
                if depends else None))
        if depends:
            # keep the volume's content: merge the doomed part of its chain into its own file
            info = await agent(p, w.host or "", w.command("info"),
                               w.body(installPath=snap.primaryStorageInstallPath))
            await agent(p, w.host or "", w.command("rebase"),
                        w.body(installPath=vol.installPath, backing=info.get("backing")))
            async with p.db.tx() as s:
                if snap.parentUuid:
                    await s.execute(update(m.VolumeSnapshot).where(m.VolumeSnapshot.uuid == snap.parentUuid)
                                    .values(latest=True))
        await _drop(p, [x.uuid for x in reversed(doomed)], w.host or "", w.ps)
    return {}


async def _drop(p: Platform, uuids: list[str], host: str, ps: m.PrimaryStorage) -> None:
    """Delete snapshots (children first): their files (through the GC if the host is away),
    capacity and rows."""
    for uuid in uuids:
        async with p.db.tx() as s:
            snap = await s.get(m.VolumeSnapshot, uuid)
            if snap is None:
                continue
            path, vol_uuid = snap.primaryStorageInstallPath, snap.volumeUuid
            await primary.release(s, uuid)
            await s.delete(snap)
            await disown(s, [uuid])
        if path:
            await gc.call_or_defer(p, gc.DELETE_VOLUME_FILE, host, primary.command(ps, "delete"),
                                   {"path": ps.url, "installPath": path}, uuid)
        async with p.db.tx() as s:
            left = (await s.execute(select(m.VolumeSnapshot.uuid).where(m.VolumeSnapshot.volumeUuid == vol_uuid))
                    ).first()
            if left is None:
                await s.execute(delete(m.VolumeSnapshotTree).where(m.VolumeSnapshotTree.volumeUuid == vol_uuid))


async def drop_snapshots(p: Platform, vol_uuid: str, host: str, ps: m.PrimaryStorage) -> None:
    """Every snapshot of a volume that is being expunged."""
    async with p.db.tx() as s:
        snaps = await snapshots_of(s, vol_uuid)
    order: list[m.VolumeSnapshot] = []
    for root in [x for x in snaps if x.parentUuid is None or x.parentUuid not in {y.uuid for y in snaps}]:
        order += _subtree(snaps, root.uuid)
    await _drop(p, [x.uuid for x in reversed(order)], host, ps)
