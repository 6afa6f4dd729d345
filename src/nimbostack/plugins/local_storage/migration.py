"""LocalStorageMigrateVolume (release 1.0 §3): move a volume, with its snapshots, from one host's
share of a LocalStorage primary storage to another host's.

Rules: a root volume's VM is Stopped; a data volume is detached; the destination host is another
Connected, Enabled host of a cluster the storage is attached to, with room for the volume and its
snapshots. How:

1. the destination host's share is charged for the volume and its snapshots (LocalStorageHostRef);
2. the destination agent pulls the files from the source agent over the agents' HTTP wire
   (GET /storage/file), parents first: the image cache the volume is backed by when it is not
   there yet, then the snapshots, then the volume's own file. Each file is written as
   ``<file>.part``, re-pointed at its backing file on the destination (``qemu-img rebase -u``),
   checked and renamed;
3. one transaction moves the volume (Volume.hostUuid) and its capacity records
   (LocalStorageResourceRef) to the destination and gives the source's share back;
4. the source's files are deleted (through the GC when the source host is unreachable).

A failure before 3 (an agent killed mid-copy included) deletes what reached the destination —
through the GC when the destination agent is the one that died; the agent removes ``.part``
leftovers when it starts — and gives the destination's share back: the volume is where it was,
intact. After 3 the migration is complete; only the old copies are left for the GC to remove."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from nimbostack.core import gc
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import STORAGE_ALLOCATION_FAILED, ApiError, invalid, not_allowed
from nimbostack.core.flow import FlowChain
from nimbostack.core.hosts import agent
from nimbostack.core.resources import inv, load
from nimbostack.db import models as m
from nimbostack.plugins.local_storage.backend import LOCAL
from nimbostack.storage.snapshot import serial, snapshots_of

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform



async def _plan(s: Any, vol: m.Volume) -> tuple[m.PrimaryStorage, list[m.VolumeSnapshot], int]:
    """Check the volume may move at all; its storage, its snapshots and the bytes they hold."""
    if vol.status != "Ready" or not vol.installPath:
        raise not_allowed(f"volume {vol.uuid} is {vol.status}; only a Ready volume migrates")
    ps = await s.get(m.PrimaryStorage, vol.primaryStorageUuid) if vol.primaryStorageUuid else None
    if ps is None or ps.type != LOCAL.type or not vol.hostUuid:
        kind = ps.type if ps is not None else "no"
        raise not_allowed(
            f"volume {vol.uuid} is on {kind} primary storage; LocalStorageMigrateVolume moves volumes of "
            "LocalStorage only (every host of a shared storage reaches its volumes already)"
        )
    if vol.type == "Root":
        vm = (await s.execute(select(m.VmInstance).where(m.VmInstance.rootVolumeUuid == vol.uuid))).scalar_one_or_none()
        if vm is not None and vm.state not in ("Stopped", "Destroyed"):
            raise not_allowed(
                f"volume {vol.uuid} is the root volume of VM {vm.uuid}, which is {vm.state}; stop the VM first"
            )
    elif vol.vmInstanceUuid:
        raise not_allowed(
            f"data volume {vol.uuid} is attached to VM {vol.vmInstanceUuid}; detach it first (DetachDataVolumeFromVm)"
        )
    snaps = await snapshots_of(s, vol.uuid)
    refs = (
        await s.execute(
            select(m.LocalStorageResourceRef).where(
                m.LocalStorageResourceRef.resourceUuid.in_([vol.uuid] + [x.uuid for x in snaps])
            )
        )
    ).scalars().all()
    return ps, snaps, sum(r.size for r in refs)


async def _check_dest(s: Any, vol: m.Volume, ps: m.PrimaryStorage, dest_uuid: str, need: int,
                      ctx: ApiContext | None = None) -> m.Host:
    dest = await load(s, m.Host, dest_uuid, ctx, "Host") if ctx is not None else await s.get(m.Host, dest_uuid)
    if dest is None:
        raise invalid(f"host {dest_uuid} does not exist")
    if dest.uuid == vol.hostUuid:
        raise invalid(f"volume {vol.uuid} is on host {dest.uuid} already")
    attached = (
        await s.execute(
            select(m.PrimaryStorageClusterRef.id).where(
                m.PrimaryStorageClusterRef.primaryStorageUuid == ps.uuid,
                m.PrimaryStorageClusterRef.clusterUuid == dest.clusterUuid,
            )
        )
    ).first()
    if not attached:
        raise not_allowed(
            f"host {dest.uuid} is in cluster {dest.clusterUuid}, which primary storage {ps.uuid} is not attached to"
        )
    if dest.status != "Connected":
        raise not_allowed(f"destination host {dest.uuid} is {dest.status}; it must be Connected")
    if dest.state != "Enabled":
        raise not_allowed(f"destination host {dest.uuid} is {dest.state}; it must be Enabled")
    share = (
        await s.execute(
            select(m.LocalStorageHostRef).where(
                m.LocalStorageHostRef.primaryStorageUuid == ps.uuid, m.LocalStorageHostRef.hostUuid == dest.uuid
            )
        )
    ).scalar_one_or_none()
    if share is None or share.availableCapacity < need:
        free = share.availableCapacity if share is not None else 0
        raise ApiError(
            STORAGE_ALLOCATION_FAILED,
            "The destination host has not enough local storage",
            f"volume {vol.uuid} and its snapshots need {need} bytes; host {dest.uuid} has {free} free on "
            f"primary storage {ps.uuid}",
        )
    return dest


@api("GetLocalStorageHostDiskCapacity", admin=True)
async def host_disk_capacity(ctx: ApiContext) -> dict[str, Any]:
    """Each host's share of a LocalStorage primary storage (or one host's)."""
    async with ctx.p.db.tx() as s:
        ps = await load(s, m.PrimaryStorage, ctx.req("primaryStorageUuid"), ctx, "PrimaryStorage")
        stmt = select(m.LocalStorageHostRef).where(m.LocalStorageHostRef.primaryStorageUuid == ps.uuid)
        if ctx.str("hostUuid"):
            stmt = stmt.where(m.LocalStorageHostRef.hostUuid == ctx.str("hostUuid"))
        refs = (await s.execute(stmt.order_by(m.LocalStorageHostRef.hostUuid))).scalars().all()
        return {"inventories": [
            {"hostUuid": r.hostUuid, "totalCapacity": r.totalCapacity, "availableCapacity": r.availableCapacity,
             "totalPhysicalCapacity": r.totalPhysicalCapacity, "availablePhysicalCapacity": r.availablePhysicalCapacity}
            for r in refs
        ]}


@api("LocalStorageGetVolumeMigratableHosts")
async def migratable_hosts(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        vol = await load(s, m.Volume, ctx.req("volumeUuid"), ctx, "Volume", owned=True)
        ps, _, need = await _plan(s, vol)
        clusters = select(m.PrimaryStorageClusterRef.clusterUuid).where(
            m.PrimaryStorageClusterRef.primaryStorageUuid == ps.uuid
        )
        hosts = (
            await s.execute(
                select(m.Host)
                .join(m.LocalStorageHostRef, m.LocalStorageHostRef.hostUuid == m.Host.uuid)
                .where(
                    m.Host.clusterUuid.in_(clusters),
                    m.Host.uuid != vol.hostUuid,
                    m.Host.status == "Connected",
                    m.Host.state == "Enabled",
                    m.LocalStorageHostRef.primaryStorageUuid == ps.uuid,
                    m.LocalStorageHostRef.availableCapacity >= need,
                )
                .order_by(m.Host.name, m.Host.uuid)
            )
        ).scalars().all()
        return {"inventories": [await inv(s, "QueryObjectHostInventory", h) for h in hosts]}


def _files(vol: m.Volume, snaps: list[m.VolumeSnapshot], cache: str | None) -> list[dict[str, Any]]:
    """The volume's files, parents first, each with the file it is backed by; ``cache``: the
    image cache the chain starts from (fetched only if the destination lacks it)."""
    by = {x.uuid: x for x in snaps}
    files: list[dict[str, Any]] = []
    if cache:
        files.append({"installPath": cache, "skipIfExists": True})
    done: set[str] = set()

    def add(snap: m.VolumeSnapshot) -> None:
        if snap.uuid in done:
            return
        parent = by.get(snap.parentUuid or "")
        if parent is not None:
            add(parent)
        done.add(snap.uuid)
        files.append({"installPath": snap.primaryStorageInstallPath,
                      "backing": parent.primaryStorageInstallPath if parent is not None else cache})

    for snap in snaps:
        add(snap)
    latest = next((x for x in snaps if x.latest), None)
    files.append({"installPath": vol.installPath,
                  "backing": latest.primaryStorageInstallPath if latest is not None else cache})
    return files


@api("LocalStorageMigrateVolume")
async def migrate_volume(ctx: ApiContext) -> dict[str, Any]:
    p = ctx.p
    async with p.db.tx() as s:
        vol = await load(s, m.Volume, ctx.req("volumeUuid"), ctx, "Volume", owned=True)
        vm = (await s.execute(select(m.VmInstance.uuid).where(m.VmInstance.rootVolumeUuid == vol.uuid))).scalar()
    async with serial(p, vm, vol.uuid):
        await migrate(p, vol.uuid, ctx.req("destHostUuid"), ctx)
    async with p.db.tx() as s:
        return {"inventory": await inv(s, "QueryObjectVolumeInventory", await s.get(m.Volume, vol.uuid))}


async def migrate(p: Platform, vol_uuid: str, dest_uuid: str, ctx: ApiContext | None = None) -> None:
    c: dict[str, Any] = {}

    async def reserve(c: dict[str, Any]) -> None:
        async with p.db.tx() as s:
            vol = await s.get(m.Volume, vol_uuid)
            assert vol is not None
            ps, snaps, need = await _plan(s, vol)
            dest = await _check_dest(s, vol, ps, dest_uuid, need, ctx)
            source = await s.get(m.Host, vol.hostUuid)
            if source is None or source.status != "Connected":
                raise not_allowed(
                    f"volume {vol.uuid}'s host {vol.hostUuid} is {source.status if source else 'gone'}; "
                    "its files can only be copied from a Connected host"
                )
            if not await LOCAL.take(s, ps.uuid, dest.uuid, need):
                raise ApiError(STORAGE_ALLOCATION_FAILED, "The destination host has not enough local storage",
                               f"host {dest.uuid} has less than {need} bytes free on primary storage {ps.uuid}")
            vol.status = "Migrating"
            c.update(vol=vol, ps=ps, snaps=snaps, need=need, dest=dest.uuid, dest_cluster=dest.clusterUuid,
                     src=source.uuid, src_url=source.agentUrl)

    async def unreserve(c: dict[str, Any]) -> None:
        async with p.db.tx() as s:
            await LOCAL.give(s, c["ps"].uuid, c["dest"], c["need"])
            await s.execute(update(m.Volume).where(m.Volume.uuid == vol_uuid).values(status="Ready"))

    async def copy(c: dict[str, Any]) -> None:
        vol, ps, snaps = c["vol"], c["ps"], c["snaps"]
        # the file the chain starts from (the oldest snapshot, or the volume) tells the image cache
        base = next((x.primaryStorageInstallPath for x in snaps if not x.parentUuid), vol.installPath)
        info = await agent(p, c["src"], LOCAL.command("info"), {"path": ps.url, "installPath": base})
        if not info.get("exists"):
            raise not_allowed(f"volume {vol_uuid}'s file {base} is missing on host {c['src']}")
        files = _files(vol, snaps, info.get("backing"))
        c["copied"] = [f["installPath"] for f in files if not f.get("skipIfExists")]
        await agent(p, c["dest"], LOCAL.command("pull"), {
            "path": ps.url, "sourceUrl": c["src_url"], "sourceHostUuid": c["src"], "files": files})

    async def uncopy(c: dict[str, Any]) -> None:
        for path in c.get("copied", []):  # what reached the destination (a whole file or a .part): not kept
            await gc.call_or_defer(p, gc.DELETE_VOLUME_FILE, c["dest"], LOCAL.command("delete"),
                                   {"path": c["ps"].url, "installPath": path}, vol_uuid)

    async def switch(c: dict[str, Any]) -> None:
        async with p.db.tx() as s:
            ids = [vol_uuid] + [x.uuid for x in c["snaps"]]
            await s.execute(update(m.LocalStorageResourceRef).where(
                m.LocalStorageResourceRef.resourceUuid.in_(ids)).values(hostUuid=c["dest"]))
            await LOCAL.give(s, c["ps"].uuid, c["src"], c["need"])
            await s.execute(update(m.Volume).where(m.Volume.uuid == vol_uuid).values(
                status="Ready", hostUuid=c["dest"]))
            if c["vol"].type == "Root":
                await s.execute(update(m.VmInstance).where(m.VmInstance.rootVolumeUuid == vol_uuid).values(
                    lastHostUuid=c["dest"], clusterUuid=c["dest_cluster"]))

    await (
        FlowChain("local-storage-migrate-volume")
        .then("reserve-destination", reserve, unreserve)
        .then("copy", copy, uncopy)
        .then("switch", switch)
        .run(c)
    )
    # the migration stands; the old copies go now, or later through the GC
    ps, src = c["ps"], c["src"]
    work = [(gc.DELETE_VOLUME_FILE, LOCAL.command("delete"), {"path": ps.url, "installPath": path}, vol_uuid)
            for path in c["copied"]]
    if c["vol"].type == "Root":  # the stopped VM's domain definition stays behind on the old host
        vm = await _vm_of_root(p, vol_uuid)
        if vm is not None and vm.state == "Stopped":
            work.append((gc.DESTROY_VM, "/vm/destroy", {"vmUuid": vm.uuid}, vm.uuid))
    for name, path, body, resource in work:
        try:
            await gc.call_or_defer(p, name, src, path, body, resource)
        except ApiError as err:
            await gc.submit(p, name, src, path, body, f"{err.description}: {err.details}", resource)


async def _vm_of_root(p: Platform, vol_uuid: str) -> m.VmInstance | None:
    async with p.db.tx() as s:
        return (await s.execute(select(m.VmInstance).where(m.VmInstance.rootVolumeUuid == vol_uuid))).scalar()
