"""Images from volumes, and volumes from images: templates of a root or data volume or of a
snapshot (CreateRootVolumeTemplateFromRootVolume, CreateDataVolumeTemplateFromVolume,
CreateRootVolumeTemplateFromVolumeSnapshot), a data volume from a data volume template
(CreateDataVolumeFromVolumeTemplate), a data volume from a snapshot
(CreateDataVolumeFromVolumeSnapshot), SyncImageSize and GetVolumeSnapshotTree.

A template is a standalone qcow2: the host agent that keeps the volume's files merges the file
and its whole backing chain (snapshots, the image cache) into one file (``export``); each
backup storage's agent then fetches that file from the host agent (``/bs/pull``, mutual TLS),
checks it with qemu-img and keeps it; the exported file goes. A failure anywhere removes the
image's row and every file made for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, update

from nimbostack.core import gc
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import invalid, not_allowed, not_found
from nimbostack.core.hosts import agent
from nimbostack.core.resources import add_creation_tags, disown, inv, load, new_uuid, own
from nimbostack.db import models as m
from nimbostack.storage import backend, primary
from nimbostack.storage.backup import SIMULATOR_BS, copy_source, follow, take_capacity
from nimbostack.storage.snapshot import serial

PLATFORMS = ("Linux", "Windows", "Other", "Paravirtualization", "WindowsVirtio")


@dataclass
class _Source:
    """The file an image is made of and where it lives."""

    vol: m.Volume
    ps: m.PrimaryStorage
    host: str
    install_path: str


async def _source(s: Any, vol: m.Volume, install_path: str | None, vm: m.VmInstance | None) -> _Source:
    if not vol.primaryStorageUuid or not install_path:
        raise not_allowed(f"volume {vol.uuid} is {vol.status}; it has no file to make an image of")
    ps = await s.get(m.PrimaryStorage, vol.primaryStorageUuid)
    if ps is None or ps.type not in backend.BACKENDS:
        raise not_allowed(f"volume {vol.uuid}'s primary storage keeps no files an image is made of")
    preferred = vm.lastHostUuid or vm.hostUuid if vm is not None else None
    host = await primary.file_host(s, ps, vol.hostUuid, preferred)
    if host is None:
        raise not_allowed(f"no host reaches primary storage {ps.uuid} of volume {vol.uuid}")
    return _Source(vol, ps, host, install_path)


async def _stores(s: Any, ctx: ApiContext, zone_uuid: str, need: int) -> list[m.BackupStorage]:
    """The backup storages named (``backupStorageUuids``), each Enabled, in the volume's zone and
    with room for the copy; without names, the zone's Enabled store with the most room."""
    in_zone = set((await s.execute(select(m.BackupStorageZoneRef.backupStorageUuid).where(
        m.BackupStorageZoneRef.zoneUuid == zone_uuid))).scalars())
    names = [str(u) for u in ctx.list("backupStorageUuids")]
    if not names:
        rows = (await s.execute(
            select(m.BackupStorage).where(m.BackupStorage.uuid.in_(in_zone), m.BackupStorage.state == "Enabled")
            .order_by(m.BackupStorage.availableCapacity.desc()))).scalars().all()
        if not rows or rows[0].availableCapacity < need:
            raise not_allowed(f"no Enabled backup storage of zone {zone_uuid} has {need} bytes free for the image")
        return [rows[0]]
    stores = []
    for uuid in dict.fromkeys(names):
        bs = await s.get(m.BackupStorage, uuid)
        if bs is None:
            raise not_found("BackupStorage", uuid)
        if bs.state != "Enabled":
            raise not_allowed(f"backup storage {bs.uuid} is {bs.state}")
        if bs.uuid not in in_zone:
            raise not_allowed(f"backup storage {bs.uuid} is not attached to zone {zone_uuid} of the volume's "
                              "primary storage")
        if bs.availableCapacity < need:
            raise not_allowed(f"backup storage {bs.uuid} has {bs.availableCapacity} bytes free; the image needs "
                              f"up to {need}")
        stores.append(bs)
    return stores


def _platform(ctx: ApiContext, default: str) -> str:
    value = ctx.str("platform") or default
    if value not in PLATFORMS:
        raise invalid(f"platform must be one of {', '.join(PLATFORMS)}, got {value!r}")
    return value


async def _make_image(ctx: ApiContext, src: _Source, image: m.Image) -> dict[str, Any]:
    """Record the image (Downloading), export the source on its host, have every chosen backup
    storage fetch the export; Ready with the copies' sizes, or nothing left at all."""
    p = ctx.p
    async with p.db.tx() as s:
        stores = await _stores(s, ctx, src.ps.zoneUuid, max(src.vol.actualSize or 0, 0))
        s.add(image)
        await own(s, ctx, image.uuid, "ImageVO")
        await add_creation_tags(s, ctx, image.uuid, "ImageVO")
        for bs in stores:
            s.add(m.ImageBackupStorageRef(imageUuid=image.uuid, backupStorageUuid=bs.uuid, status="Downloading"))
        host_url = (await s.get(m.Host, src.host)).agentUrl
    export_path = f"{src.ps.url.rstrip('/')}/export/{image.uuid}.qcow2"
    body = {"path": src.ps.url}
    copies: list[tuple[m.BackupStorage, dict[str, Any]]] = []
    exported = False
    try:
        try:
            out = await agent(p, src.host, primary.command(src.ps, "export"),
                              {**body, "installPath": src.install_path, "exportPath": export_path})
            exported = True
            size = int(out.get("size") or 0) or src.vol.size
            for bs in stores:
                if bs.type == SIMULATOR_BS:  # keeps no files: the copy is recorded only
                    copies.append((bs, {"installPath": f"{bs.url}/images/{image.uuid}.qcow2", "size": size,
                                        "actualSize": int(out.get("actualSize") or 0), "md5": None}))
                    continue
                copies.append((bs, await follow(ctx, bs, image.uuid, "/bs/pull", {
                    "path": bs.url, "imageUuid": image.uuid, "format": "qcow2", "sourceUrl": host_url,
                    "sourceHostUuid": src.host, "sourcePath": export_path})))
        finally:
            if exported:
                await gc.call_or_defer(p, gc.DELETE_VOLUME_FILE, src.host, primary.command(src.ps, "delete"),
                                       {**body, "installPath": export_path}, image.uuid)
    except BaseException:
        async with p.db.tx() as s:
            await s.execute(delete(m.Image).where(m.Image.uuid == image.uuid))
            await disown(s, [image.uuid])
        for bs, result in copies:
            if bs.agentUrl:
                await gc.call_or_defer(p, gc.DELETE_IMAGE_FILE, bs.uuid, "/bs/delete",
                                       {"path": bs.url, "installPath": result["installPath"]}, image.uuid)
        raise
    async with p.db.tx() as s:
        row = await s.get(m.Image, image.uuid)
        first = copies[0][1]
        row.status, row.size, row.actualSize, row.md5Sum = "Ready", int(first["size"]), int(first["actualSize"]), \
            first["md5"]
        for bs, result in copies:
            await s.execute(
                update(m.ImageBackupStorageRef)
                .where(m.ImageBackupStorageRef.imageUuid == image.uuid,
                       m.ImageBackupStorageRef.backupStorageUuid == bs.uuid)
                .values(status="Ready", installPath=result["installPath"])
            )
            await take_capacity(s, bs.uuid, int(result["actualSize"] or 0))
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectImageInventory", row)}


def _image(ctx: ApiContext, url: str, media: str, platform: str, guest_os: str | None) -> m.Image:
    return m.Image(uuid=new_uuid(ctx), name=ctx.req("name"), description=ctx.str("description"), url=url,
                   mediaType=media, guestOsType=ctx.str("guestOsType") or guest_os, format="qcow2",
                   platform=platform, system=ctx.bool("system"), type="zstack", status="Downloading")


async def _root_image_facts(s: Any, vol: m.Volume, vm: m.VmInstance | None) -> tuple[str, str | None]:
    """The platform and guest OS a template of the volume inherits: its VM's, its image's."""
    base = await s.get(m.Image, vol.rootImageUuid) if vol.rootImageUuid else None
    platform = (vm.platform if vm is not None and vm.platform else None) or (base.platform if base else None)
    return platform or "Linux", base.guestOsType if base else None


def _check_volume(vol: m.Volume) -> None:
    if vol.status != "Ready":
        raise not_allowed(f"volume {vol.uuid} is not Ready, it's {vol.status}")
    if vol.state != "Enabled":
        raise not_allowed(f"volume {vol.uuid} is not Enabled, it's {vol.state}")


async def _vm_stopped(s: Any, vol: m.Volume, what: str) -> m.VmInstance | None:
    """A volume's file is copied whole only while nothing writes it: its VM Stopped (ZStack 1.2
    allows a template of a root volume in that state only)."""
    vm = await s.get(m.VmInstance, vol.vmInstanceUuid) if vol.vmInstanceUuid else None
    if vm is not None and vm.state != "Stopped":
        raise not_allowed(f"VM {vm.uuid} is {vm.state}; {what} of its volume {vol.uuid} needs it Stopped")
    return vm


async def _volume_template(ctx: ApiContext, vol_uuid: str, root: bool) -> dict[str, Any]:
    p = ctx.p
    async with p.db.tx() as s:
        vol = await load(s, m.Volume, vol_uuid, ctx, "Volume", owned=True)
    async with serial(p, vol.vmInstanceUuid, vol.uuid):
        async with p.db.tx() as s:
            vol = await load(s, m.Volume, vol.uuid, ctx, "Volume")
            if root and vol.type != "Root":
                raise invalid(f"volume {vol.uuid} is not a Root volume, it's {vol.type}")
            _check_volume(vol)
            vm = await _vm_stopped(s, vol, "a template")
            src = await _source(s, vol, vol.installPath, vm)
            platform, guest_os = await _root_image_facts(s, vol, vm)
        if root:
            image = _image(ctx, f"volume://{vol.uuid}", "RootVolumeTemplate", _platform(ctx, platform), guest_os)
        else:
            image = _image(ctx, f"volume://{vol.uuid}", "DataVolumeTemplate", "Linux", None)
        image.size, image.actualSize = vol.size, vol.actualSize
        return await _make_image(ctx, src, image)


@api("CreateRootVolumeTemplateFromRootVolume")
async def template_from_root_volume(ctx: ApiContext) -> dict[str, Any]:
    """An image of a stopped VM's root volume (its snapshots and base image merged in)."""
    return await _volume_template(ctx, ctx.req("rootVolumeUuid"), root=True)


@api("CreateDataVolumeTemplateFromVolume")
async def template_from_volume(ctx: ApiContext) -> dict[str, Any]:
    """A data volume template of a volume that is detached or whose VM is Stopped."""
    return await _volume_template(ctx, ctx.req("volumeUuid"), root=False)


@api("CreateRootVolumeTemplateFromVolumeSnapshot")
async def template_from_snapshot(ctx: ApiContext) -> dict[str, Any]:
    """An image of the volume as the snapshot froze it: the snapshot's file never changes, so the
    volume's VM may run meanwhile."""
    p = ctx.p
    async with p.db.tx() as s:
        snap = await load(s, m.VolumeSnapshot, ctx.req("snapshotUuid"), ctx, "VolumeSnapshot", owned=True)
        vol = await load(s, m.Volume, snap.volumeUuid, ctx, "Volume")
    async with serial(p, vol.vmInstanceUuid, vol.uuid):
        async with p.db.tx() as s:
            snap = await load(s, m.VolumeSnapshot, snap.uuid, ctx, "VolumeSnapshot")
            if snap.status != "Ready":
                raise not_allowed(f"volume snapshot {snap.uuid} is not Ready, it's {snap.status}")
            if snap.state != "Enabled":
                raise not_allowed(f"volume snapshot {snap.uuid} is not Enabled, it's {snap.state}")
            vol = await load(s, m.Volume, snap.volumeUuid, ctx, "Volume")
            vm = await s.get(m.VmInstance, vol.vmInstanceUuid) if vol.vmInstanceUuid else None
            src = await _source(s, vol, snap.primaryStorageInstallPath, vm)
            platform, guest_os = await _root_image_facts(s, vol, vm)
        image = _image(ctx, f"volumeSnapshot://{snap.uuid}", "RootVolumeTemplate", _platform(ctx, platform), guest_os)
        image.size, image.actualSize = vol.size, snap.size
        return await _make_image(ctx, src, image)


async def _drop_volume(ctx: ApiContext, vol_uuid: str, host: str, ps: m.PrimaryStorage, body: dict[str, Any]) -> None:
    """Undo a volume being made: its capacity, row, ownership, tags and file (``body``)."""
    async with ctx.p.db.tx() as s:
        await primary.release(s, vol_uuid)
        await s.execute(delete(m.Volume).where(m.Volume.uuid == vol_uuid))
        await disown(s, [vol_uuid])
    await gc.call_or_defer(ctx.p, gc.DELETE_VOLUME_FILE, host, primary.command(ps, "delete"), body, vol_uuid)


@api("CreateDataVolumeFromVolumeTemplate")
async def volume_from_template(ctx: ApiContext) -> dict[str, Any]:
    """A Ready, detached data volume on the primary storage (on ``hostUuid``'s share of a local
    storage), backed by the template cached there."""
    p = ctx.p
    async with p.db.tx() as s:
        image = await load(s, m.Image, ctx.req("imageUuid"), ctx, "Image")
        if image.mediaType != "DataVolumeTemplate":
            raise invalid(f"image {image.uuid} is a {image.mediaType}, not a DataVolumeTemplate")
        if image.status != "Ready" or image.state != "Enabled":
            raise not_allowed(f"image {image.uuid} is {image.state}/{image.status}; it must be Enabled and Ready")
        ps = await s.get(m.PrimaryStorage, ctx.req("primaryStorageUuid"))
        if ps is None or ps.type not in backend.BACKENDS:
            raise not_found("PrimaryStorage", ctx.req("primaryStorageUuid"))
        if ps.state != "Enabled":
            raise not_allowed(f"primary storage {ps.uuid} is {ps.state}")
        attached = set((await s.execute(select(m.PrimaryStorageClusterRef.clusterUuid).where(
            m.PrimaryStorageClusterRef.primaryStorageUuid == ps.uuid))).scalars())
        host_uuid = ctx.str("hostUuid")
        if host_uuid is None and backend.of(ps).host_bound:
            raise invalid(f"primary storage {ps.uuid} is {ps.type}: hostUuid names the host whose disks keep "
                          "the volume")
        host_uuid = host_uuid or await primary.file_host(s, ps, None)
        host = await s.get(m.Host, host_uuid) if host_uuid else None
        if host is None:
            raise not_found("Host", host_uuid or "") if host_uuid else not_allowed(
                f"no host reaches primary storage {ps.uuid}")
        if host.clusterUuid not in attached:
            raise not_allowed(f"host {host.uuid} is in no cluster primary storage {ps.uuid} is attached to")
        url = await copy_source(s, image.uuid, ps.zoneUuid)
        vol = m.Volume(uuid=new_uuid(ctx), name=ctx.req("name"), description=ctx.str("description"), type="Data",
                       format="qcow2", size=image.size, rootImageUuid=image.uuid, status="Creating")
        await primary.reserve(s, host.clusterUuid, host.uuid, image.size, vol.uuid, "VolumeVO", ps.uuid)
        vol.primaryStorageUuid, vol.hostUuid = ps.uuid, primary.placement(ps, host.uuid)
        vol.installPath = primary.install_path(ps, ctx.caller.account_uuid, vol.uuid, "Data")
        s.add(vol)
        await own(s, ctx, vol.uuid, "VolumeVO")
        await add_creation_tags(s, ctx, vol.uuid, "VolumeVO")
    body = {"path": ps.url, "installPath": vol.installPath}
    try:
        out = await agent(p, host.uuid, primary.command(ps, "create-root"), {
            **body, "imageUuid": image.uuid, "imageUrl": url, "md5": image.md5Sum, "size": image.size})
    except BaseException:
        await _drop_volume(ctx, vol.uuid, host.uuid, ps, body)
        raise
    async with p.db.tx() as s:
        row = await s.get(m.Volume, vol.uuid)
        row.status, row.actualSize = "Ready", int(out.get("actualSize") or 0)
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectVolumeInventory", row)}


@api("CreateDataVolumeFromVolumeSnapshot")
async def volume_from_snapshot(ctx: ApiContext) -> dict[str, Any]:
    """A Ready, detached data volume with the content the snapshot froze: one standalone qcow2
    (the snapshot's chain merged in, ``export``) beside the snapshot, on its primary storage (and
    host, on LocalStorage)."""
    p = ctx.p
    async with p.db.tx() as s:
        snap = await load(s, m.VolumeSnapshot, ctx.req("volumeSnapshotUuid"), ctx, "VolumeSnapshot", owned=True)
        vol = await load(s, m.Volume, snap.volumeUuid, ctx, "Volume")
    async with serial(p, vol.vmInstanceUuid, vol.uuid):
        async with p.db.tx() as s:
            snap = await load(s, m.VolumeSnapshot, snap.uuid, ctx, "VolumeSnapshot")
            if snap.status != "Ready" or snap.state != "Enabled":
                raise not_allowed(f"volume snapshot {snap.uuid} is {snap.state}/{snap.status}; it must be "
                                  "Enabled and Ready")
            vol = await load(s, m.Volume, snap.volumeUuid, ctx, "Volume")
            vm = await s.get(m.VmInstance, vol.vmInstanceUuid) if vol.vmInstanceUuid else None
            src = await _source(s, vol, snap.primaryStorageInstallPath, vm)
            wanted = ctx.str("primaryStorageUuid")
            if wanted and wanted != src.ps.uuid:
                raise not_allowed(f"volume snapshot {snap.uuid} is on primary storage {src.ps.uuid}; a volume is "
                                  f"made from it there, not on {wanted}")
            host = await s.get(m.Host, src.host)
            new = m.Volume(uuid=new_uuid(ctx), name=ctx.req("name"), description=ctx.str("description"), type="Data",
                           format="qcow2", size=vol.size, status="Creating")
            await primary.reserve(s, host.clusterUuid, host.uuid, vol.size, new.uuid, "VolumeVO", src.ps.uuid)
            new.primaryStorageUuid, new.hostUuid = src.ps.uuid, primary.placement(src.ps, host.uuid)
            new.installPath = primary.install_path(src.ps, ctx.caller.account_uuid, new.uuid, "Data")
            s.add(new)
            await own(s, ctx, new.uuid, "VolumeVO")
            await add_creation_tags(s, ctx, new.uuid, "VolumeVO")
        body = {"path": src.ps.url, "installPath": new.installPath}
        try:
            out = await agent(p, src.host, primary.command(src.ps, "export"),
                              {"path": src.ps.url, "installPath": src.install_path, "exportPath": new.installPath})
        except BaseException:
            await _drop_volume(ctx, new.uuid, src.host, src.ps, body)
            raise
    async with p.db.tx() as s:
        row = await s.get(m.Volume, new.uuid)
        row.status, row.actualSize = "Ready", int(out.get("actualSize") or 0)
        row.size = int(out.get("size") or 0) or row.size
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectVolumeInventory", row)}


@api("SyncImageSize")
async def sync_image_size(ctx: ApiContext) -> dict[str, Any]:
    """The image's sizes as a backup storage that keeps its file finds them now."""
    p = ctx.p
    async with p.db.tx() as s:
        image = await load(s, m.Image, ctx.req("uuid"), ctx, "Image")
        refs = (await s.execute(select(m.ImageBackupStorageRef, m.BackupStorage).join(
            m.BackupStorage, m.BackupStorage.uuid == m.ImageBackupStorageRef.backupStorageUuid).where(
            m.ImageBackupStorageRef.imageUuid == image.uuid, m.ImageBackupStorageRef.status == "Ready"))).all()
    kept = [(ref, bs) for ref, bs in refs if bs.agentUrl]
    if not refs:
        raise not_allowed(f"image {image.uuid} has no Ready copy on a backup storage")
    if kept:
        ref, bs = kept[0]
        found = await p.agents.call(bs.agentUrl, "/bs/info", {"path": bs.url, "installPath": ref.installPath,
                                                               "format": image.format})
        if not found.get("exists"):
            raise not_allowed(f"image {image.uuid}'s file {ref.installPath} is not on backup storage {bs.uuid}")
        async with p.db.tx() as s:
            row = await s.get(m.Image, image.uuid)
            row.actualSize, row.size = int(found["actualSize"]), int(found.get("size") or row.size)
    async with p.db.tx() as s:
        return {"inventory": await inv(s, "QueryObjectImageInventory", await s.get(m.Image, image.uuid))}


@api("GetVolumeSnapshotTree")
async def snapshot_tree(ctx: ApiContext) -> dict[str, Any]:
    """The snapshot trees of a volume (or one tree): each snapshot a leaf with its children."""
    vol_uuid, tree_uuid = ctx.str("volumeUuid"), ctx.str("treeUuid")
    if not vol_uuid and not tree_uuid:
        raise invalid("volumeUuid or treeUuid must be given")
    async with ctx.p.db.tx() as s:
        stmt = select(m.VolumeSnapshotTree).order_by(m.VolumeSnapshotTree.createDate)
        if tree_uuid:
            stmt = stmt.where(m.VolumeSnapshotTree.uuid == tree_uuid)
        if vol_uuid:
            await load(s, m.Volume, vol_uuid, ctx, "Volume", owned=True)
            stmt = stmt.where(m.VolumeSnapshotTree.volumeUuid == vol_uuid)
        trees = (await s.execute(stmt)).scalars().all()
        out = []
        for tree in trees:
            await load(s, m.Volume, tree.volumeUuid, ctx, "Volume", owned=True)
            snaps = (await s.execute(select(m.VolumeSnapshot).where(m.VolumeSnapshot.treeUuid == tree.uuid)
                                     .order_by(m.VolumeSnapshot.createDate, m.VolumeSnapshot.uuid))).scalars().all()
            invs = {x.uuid: await inv(s, "QueryObjectVolumeSnapshotInventory", x) for x in snaps}

            def leaf(snap: m.VolumeSnapshot, invs: dict[str, Any] = invs, snaps: Any = snaps) -> dict[str, Any]:
                node: dict[str, Any] = {"inventory": invs[snap.uuid],
                                        "children": [leaf(c) for c in snaps if c.parentUuid == snap.uuid]}
                if snap.parentUuid:
                    node["parentUuid"] = snap.parentUuid
                return node

            entry = await inv(s, "QueryObjectVolumeSnapshotTreeInventory", tree)
            roots = [x for x in snaps if not x.parentUuid or x.parentUuid not in invs]
            if roots:
                entry["tree"] = leaf(roots[0])
            out.append(entry)
        return {"inventories": out}
