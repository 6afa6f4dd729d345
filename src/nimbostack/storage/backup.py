"""Backup storage and images."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from sqlalchemy import bindparam, delete, func, select, update

from nimbostack.core import expunger, gc, query
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import ApiError, invalid, not_allowed
from nimbostack.core.hosts import agent_port_of, own_addresses
from nimbostack.core.resources import (
    ENABLE_DISABLE,
    Scope,
    add_creation_tags,
    capacity_sums,
    change_state,
    disown,
    inv,
    load,
    new_uuid,
    own,
    register_queries,
    state_event,
    update_fields,
)
from nimbostack.core.tags import tag_value
from nimbostack.db import models as m
from nimbostack.storage.primary import directory_path
from nimbostack.wire.urls import FetchPolicy, UrlRefused, tenant_forbidden

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

# What a simulator backup storage reports for every image it "downloads".
SIMULATED_IMAGE_SIZE = 1 << 30

# the backup storage types, each added by its Add<Type>BackupStorage API (GetBackupStorageTypes)
SIMULATOR_BS = "SimulatorBackupStorage"
SFTP_BS = "Sftp"
BACKUP_STORAGE_TYPES = (SIMULATOR_BS, SFTP_BS)


async def _bs_extra(s: Any, rows: Any, invs: list[dict[str, Any]]) -> None:
    refs = (
        await s.execute(
            select(m.BackupStorageZoneRef).where(m.BackupStorageZoneRef.backupStorageUuid.in_([r.uuid for r in rows]))
        )
    ).scalars()
    by: dict[str, list[str]] = {}
    for ref in refs:
        by.setdefault(ref.backupStorageUuid, []).append(ref.zoneUuid)
    for row, out in zip(rows, invs, strict=True):
        out["attachedZoneUuids"] = by.get(row.uuid, [])
        if row.type != SFTP_BS:
            out.pop("hostname", None)
            out.pop("username", None)


async def _image_extra(s: Any, rows: Any, invs: list[dict[str, Any]]) -> None:
    refs = (
        await s.execute(
            select(m.ImageBackupStorageRef).where(m.ImageBackupStorageRef.imageUuid.in_([r.uuid for r in rows]))
        )
    ).scalars()
    by: dict[str, list[dict[str, Any]]] = {}
    for ref in refs:
        by.setdefault(ref.imageUuid, []).append(
            query.plain(ref, ["imageUuid", "backupStorageUuid", "installPath", "status", "createDate", "lastOpDate"])
        )
    for row, out in zip(rows, invs, strict=True):
        out["backupStorageRefs"] = by.get(row.uuid, [])


query.register(
    query.QueryTarget(
        "QueryObjectBackupStorageInventory",
        m.BackupStorage,
        "SftpBackupStorageInventory",
        scope="admin",
        extra=_bs_extra,
        joins={
            "zone": query.Join("uuid", "QueryObjectBackupStorageZoneRefInventory", "backupStorageUuid"),
            "image": query.Join("uuid", "QueryObjectImageBackupStorageRefInventory", "backupStorageUuid"),
        },
    )
)
query.register(query.QueryTarget("QueryObjectBackupStorageZoneRefInventory", m.BackupStorageZoneRef, scope="admin"))
query.register(query.QueryTarget("QueryObjectImageBackupStorageRefInventory", m.ImageBackupStorageRef, scope="public"))
query.register(
    query.QueryTarget(
        "QueryObjectImageInventory",
        m.Image,
        "ImageInventory",
        scope="public",
        extra=_image_extra,
        joins={
            "backupStorageRefs": query.Join("uuid", "QueryObjectImageBackupStorageRefInventory", "imageUuid"),
            "backupStorage": query.Join("uuid", "QueryObjectImageBackupStorageRefInventory", "imageUuid"),
        },
    )
)
register_queries("QueryBackupStorage", "QueryImage")


@api("AddSimulatorBackupStorage", admin=True)
async def add_simulator_bs(ctx: ApiContext) -> dict[str, Any]:
    total = ctx.int("totalCapacity", 1 << 44, minimum=0)
    async with ctx.p.db.tx() as s:
        row = m.BackupStorage(
            uuid=new_uuid(ctx),
            name=ctx.req("name"),
            description=ctx.str("description"),
            url=ctx.req("url"),
            type=SIMULATOR_BS,
            totalCapacity=total,
            availableCapacity=ctx.int("availableCapacity", total, minimum=0),
        )
        s.add(row)
        await add_creation_tags(s, ctx, row.uuid, "BackupStorageVO")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectBackupStorageInventory", row)}


@api("AddSftpBackupStorage", admin=True)
async def add_sftp_bs(ctx: ApiContext) -> dict[str, Any]:
    """A directory of image files on a host, kept by that host's agent (ZStack's Sftp store; the
    agent's HTTP wire replaces SSH, the username/password are kept for compatibility)."""
    hostname = ctx.req("hostname")
    port = agent_port_of([str(t) for t in ctx.list("systemTags")], ctx.p.settings.agent_port)
    agent_url = f"https://{hostname}:{port}"
    path = directory_path(ctx.req("url"))
    uuid = new_uuid(ctx)
    reply = await ctx.p.agents.call(agent_url, "/bs/connect", {"hostUuid": uuid, "path": path})
    async with ctx.p.db.tx() as s:
        row = m.BackupStorage(uuid=uuid, name=ctx.req("name"), description=ctx.str("description"), url=path,
                              type=SFTP_BS, hostname=hostname, username=ctx.req("username"), agentUrl=agent_url,
                              totalCapacity=reply["totalCapacity"], availableCapacity=reply["availableCapacity"])
        s.add(row)
        await add_creation_tags(s, ctx, row.uuid, "BackupStorageVO")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectBackupStorageInventory", row)}


def image_source(agent_url: str, install_path: str) -> str:
    """Where a primary storage fetches an image from: its file ``install_path`` on the backup
    storage whose agent is at ``agent_url`` (which serves files below its storages' urls only)."""
    return f"{agent_url}/bs/file?{urlencode({'path': install_path})}"


# whether each backup storage is in the zone comes with the copies, in the same statement rather
# than a second one (every VM create asks)
_IMAGE_COPIES = (
    select(
        m.ImageBackupStorageRef.installPath,
        m.BackupStorage.agentUrl,
        m.BackupStorage.url,
        select(m.BackupStorageZoneRef.id)
        .where(
            m.BackupStorageZoneRef.backupStorageUuid == m.BackupStorage.uuid,
            m.BackupStorageZoneRef.zoneUuid == bindparam("zone"),
        )
        .exists()
        .label("inZone"),
    )
    .join(m.BackupStorage, m.BackupStorage.uuid == m.ImageBackupStorageRef.backupStorageUuid)
    .where(
        m.ImageBackupStorageRef.imageUuid == bindparam("image"),
        m.ImageBackupStorageRef.status == "Ready",
        m.BackupStorage.state == "Enabled",
    )
)


async def copy_source(s: Any, image_uuid: str, zone_uuid: str | None) -> str:
    """The URL a host fetches the image from: a Ready copy on a backup storage of the zone."""
    rows = (await s.execute(_IMAGE_COPIES, {"image": image_uuid, "zone": zone_uuid})).all()
    if zone_uuid:
        rows = sorted(rows, key=lambda r: not r.inZone)
    if not rows:
        raise not_allowed(f"image {image_uuid} has no Ready copy on an Enabled backup storage")
    copy = rows[0]
    return image_source(copy.agentUrl, copy.installPath)


async def take_capacity(s: Any, bs_uuid: str, size: int) -> None:
    """An image copy holds its size of the store's capacity from its download to its expunge
    (a negative ``size`` gives it back)."""
    await s.execute(
        update(m.BackupStorage)
        .where(m.BackupStorage.uuid == bs_uuid)
        .values(availableCapacity=m.BackupStorage.availableCapacity - size)
    )


BS_CAPACITY_SCOPES = {
    # a store attached to several of the zones counts once
    "zoneUuids": Scope(m.Zone, "Zone", lambda uuids: m.BackupStorage.uuid.in_(
        select(m.BackupStorageZoneRef.backupStorageUuid).where(m.BackupStorageZoneRef.zoneUuid.in_(uuids))
    )),
    "backupStorageUuids": Scope(m.BackupStorage, "BackupStorage", lambda uuids: m.BackupStorage.uuid.in_(uuids)),
}


@api("GetBackupStorageCapacity", admin=True)
async def get_bs_capacity(ctx: ApiContext) -> dict[str, Any]:
    """Capacity of the backup storages attached to some zones, or named ones (or ``all``), and
    what the image copies on them leave free."""
    total, available = await capacity_sums(
        ctx, BS_CAPACITY_SCOPES, (m.BackupStorage.totalCapacity, m.BackupStorage.availableCapacity)
    )
    return {"totalCapacity": total, "availableCapacity": available}


@api("GetBackupStorageTypes")
async def get_bs_types(ctx: ApiContext) -> dict[str, Any]:
    return {"backupStorageTypes": list(BACKUP_STORAGE_TYPES)}


@api("AttachBackupStorageToZone", admin=True)
async def attach_bs(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        bs = await load(s, m.BackupStorage, ctx.req("backupStorageUuid"), ctx, "BackupStorage")
        zone = await load(s, m.Zone, ctx.req("zoneUuid"), ctx, "Zone")
        if not (
            await s.execute(
                select(m.BackupStorageZoneRef).where(
                    m.BackupStorageZoneRef.backupStorageUuid == bs.uuid, m.BackupStorageZoneRef.zoneUuid == zone.uuid
                )
            )
        ).first():
            s.add(m.BackupStorageZoneRef(backupStorageUuid=bs.uuid, zoneUuid=zone.uuid))
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectBackupStorageInventory", bs)}


@api("DetachBackupStorageFromZone", admin=True)
async def detach_bs(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        bs = await load(s, m.BackupStorage, ctx.req("backupStorageUuid"), ctx, "BackupStorage")
        await s.execute(
            delete(m.BackupStorageZoneRef).where(
                m.BackupStorageZoneRef.backupStorageUuid == bs.uuid,
                m.BackupStorageZoneRef.zoneUuid == ctx.req("zoneUuid"),
            )
        )
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectBackupStorageInventory", bs)}


@api("ChangeBackupStorageState", admin=True)
async def change_bs_state(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        bs = await load(s, m.BackupStorage, ctx.req("uuid"), ctx, "BackupStorage")
        bs.state = state_event(ctx.req("stateEvent"), ENABLE_DISABLE)
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectBackupStorageInventory", bs)}


@api("DeleteBackupStorage", admin=True)
async def delete_bs(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        bs = await load(s, m.BackupStorage, ctx.req("uuid"), ctx, "BackupStorage")
        n = (
            await s.execute(
                select(func.count())
                .select_from(m.ImageBackupStorageRef)
                .where(m.ImageBackupStorageRef.backupStorageUuid == bs.uuid)
            )
        ).scalar_one()
        if n:
            raise not_allowed(f"backup storage {bs.uuid} still holds {n} images; delete them first")
        await s.delete(bs)
        await disown(s, [bs.uuid])
    return {}


_FORMATS = {"qcow2", "raw", "iso"}


@api("AddImage")
async def add_image(ctx: ApiContext) -> dict[str, Any]:
    fmt = ctx.req("format")
    if fmt not in _FORMATS:
        raise invalid(f"format must be one of {', '.join(sorted(_FORMATS))}, got {fmt!r}")
    media = ctx.str("mediaType") or ("ISO" if fmt == "iso" else "RootVolumeTemplate")
    bs_uuids = ctx.list("backupStorageUuids")
    if not bs_uuids:
        raise invalid("backupStorageUuids must name at least one backup storage")
    policy = await fetch_policy(ctx)
    url = ctx.req("url")
    try:
        if policy.local_path(url) is None:
            await asyncio.to_thread(policy.check_host, url)
    except UrlRefused as err:
        raise not_allowed(f"the image URL is refused: {err}") from None
    async with ctx.p.db.tx() as s:
        stores = [await load(s, m.BackupStorage, u, ctx, "BackupStorage") for u in bs_uuids]
        for bs in stores:
            if bs.state != "Enabled":
                raise not_allowed(f"backup storage {bs.uuid} is {bs.state}")
        row = m.Image(
            uuid=new_uuid(ctx),
            name=ctx.req("name"),
            description=ctx.str("description"),
            url=url,
            mediaType=media,
            guestOsType=ctx.str("guestOsType"),
            format=fmt,
            platform=ctx.str("platform", "Linux"),
            system=ctx.bool("system"),
            type=ctx.str("type", "zstack"),
            status="Downloading",
        )
        s.add(row)
        await own(s, ctx, row.uuid, "ImageVO")
        await add_creation_tags(s, ctx, row.uuid, "ImageVO")
        for bs in stores:
            s.add(m.ImageBackupStorageRef(imageUuid=row.uuid, backupStorageUuid=bs.uuid, status="Downloading"))
    try:
        results = [await _download(ctx, bs, row.uuid, row.url, fmt, policy) for bs in stores]
    except BaseException:
        async with ctx.p.db.tx() as s:
            await s.execute(delete(m.Image).where(m.Image.uuid == row.uuid))
            await disown(s, [row.uuid])
        raise
    async with ctx.p.db.tx() as s:
        row = await load(s, m.Image, row.uuid, ctx)
        row.status, row.size, row.actualSize = "Ready", results[0]["size"], results[0]["actualSize"]
        row.md5Sum = results[0]["md5"]
        for bs, result in zip(stores, results, strict=True):
            await s.execute(
                update(m.ImageBackupStorageRef)
                .where(m.ImageBackupStorageRef.imageUuid == row.uuid,
                       m.ImageBackupStorageRef.backupStorageUuid == bs.uuid)
                .values(status="Ready", installPath=result["installPath"])
            )
            await take_capacity(s, bs.uuid, int(result["actualSize"] or 0))
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectImageInventory", row)}


async def fetch_policy(ctx: ApiContext) -> FetchPolicy:
    """What the caller's image URLs may name: an admin, local files below image/localDirs and any
    host; a tenant, no local file and no host that is this node, a loopback or link-local address."""
    if ctx.caller.is_admin:
        dirs = await ctx.p.config.get("image", "localDirs")
        return FetchPolicy(local_dirs=tuple(d.strip() for d in str(dirs).split(",") if d.strip()))
    return FetchPolicy(forbid=tenant_forbidden(await own_addresses(ctx.p)))


async def _download(
    ctx: ApiContext, bs: m.BackupStorage, image_uuid: str, url: str, fmt: str, policy: FetchPolicy
) -> dict[str, Any]:
    """Have the store fetch the image; its progress becomes the job's progress."""
    if bs.type == SIMULATOR_BS:  # "downloads" at once
        return {"size": SIMULATED_IMAGE_SIZE, "actualSize": SIMULATED_IMAGE_SIZE, "md5": None,
                "installPath": f"{bs.url}/images/{image_uuid}.{fmt}"}
    body = {"hostUuid": bs.uuid, "path": bs.url, "imageUuid": image_uuid, "url": url, "format": fmt,
            "md5": tag_value([str(t) for t in ctx.list("systemTags")], "md5::"), "policy": policy.to_wire()}
    return await follow(ctx, bs, image_uuid, "/bs/download", body)


async def follow(ctx: ApiContext, bs: m.BackupStorage, image_uuid: str, path: str, body: dict[str, Any]
                 ) -> dict[str, Any]:
    """Run the store's command ``path`` that writes the image; the store's progress on it becomes
    the job's progress."""
    work = asyncio.create_task(ctx.p.agents.call(bs.agentUrl, path, body))
    last = None
    try:
        while not work.done():
            await asyncio.wait({work}, timeout=1.0)
            if work.done():
                break
            with contextlib.suppress(ApiError):
                reply = await ctx.p.agents.call(bs.agentUrl, "/bs/progress", {"imageUuid": image_uuid}, timeout=5)
                if reply["progress"] and reply["progress"] != last:
                    last = reply["progress"]
                    await ctx.p.jobs.set_progress(ctx.api_uuid, last)
        return await work
    finally:
        work.cancel()


@api("UpdateImage")
async def update_image(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.Image, ctx.req("uuid"), ctx, "Image", owned=True)
        update_fields(row, ctx, ("name", "description", "guestOsType", "platform"))
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectImageInventory", row)}


@api("ChangeImageState")
async def change_image_state(ctx: ApiContext) -> dict[str, Any]:
    return await change_state(ctx, m.Image, "Image", "QueryObjectImageInventory")


# --- deletion policy (release 1.0 §8.3): an image is Deleted when its copies on every backup
# storage are; a copy is Deleted (kept, recoverable) or, under Direct, removed with its file.


async def _refs(s: Any, image_uuid: str, bs_uuids: list[str], status: str | None = None) -> list[Any]:
    stmt = select(m.ImageBackupStorageRef).where(m.ImageBackupStorageRef.imageUuid == image_uuid)
    if bs_uuids:
        stmt = stmt.where(m.ImageBackupStorageRef.backupStorageUuid.in_(bs_uuids))
    if status:
        stmt = stmt.where(m.ImageBackupStorageRef.status == status)
    return list((await s.execute(stmt)).scalars())


async def _check_bs(s: Any, image_uuid: str, bs_uuids: list[str]) -> None:
    held = {r.backupStorageUuid for r in await _refs(s, image_uuid, [])}
    missing = [u for u in bs_uuids if u not in held]
    if missing:
        raise invalid(f"image {image_uuid} has no copy on backup storage {', '.join(missing)}")


async def _settle_image(s: Any, image_uuid: str) -> None:
    """The image's status follows its copies: gone with the last one, Deleted when all are."""
    row = await s.get(m.Image, image_uuid)
    if row is None:
        return
    refs = await _refs(s, image_uuid, [])
    if not refs:
        await s.delete(row)
        await disown(s, [image_uuid])
    elif all(r.status == "Deleted" for r in refs):
        if row.status != "Deleted":
            row.status, row.deleteDate = "Deleted", datetime.utcnow()
    elif row.status == "Deleted":
        row.status, row.deleteDate = "Ready", None


async def expunge_image(p: Platform, image_uuid: str, bs_uuids: list[str] | None = None) -> int:
    """Remove the Deleted copies (on ``bs_uuids`` or all): their files on the backup storage
    (through the GC if its agent is unreachable) and rows; the image goes with its last copy."""
    async with p.db.tx() as s:
        work = [
            (ref.id, ref.installPath, await s.get(m.BackupStorage, ref.backupStorageUuid))
            for ref in await _refs(s, image_uuid, bs_uuids or [], "Deleted")
        ]
    for _, install_path, bs in work:
        if bs is not None and bs.agentUrl and install_path:
            await gc.call_or_defer(p, gc.DELETE_IMAGE_FILE, bs.uuid, "/bs/delete",
                                   {"path": bs.url, "installPath": install_path}, image_uuid)
    async with p.db.tx() as s:
        if work:
            image = await s.get(m.Image, image_uuid)
            for _, _, bs in work:
                if bs is not None and image is not None:
                    await take_capacity(s, bs.uuid, -int(image.actualSize or 0))
            await s.execute(delete(m.ImageBackupStorageRef).where(
                m.ImageBackupStorageRef.id.in_([ref_id for ref_id, _, _ in work])))
        await _settle_image(s, image_uuid)
    return len(work)


@api("DeleteImage")
async def delete_image(ctx: ApiContext) -> dict[str, Any]:
    """Delete the image's copies on ``backupStorageUuids`` (default: all) by image/deletionPolicy."""
    p = ctx.p
    bs_uuids = ctx.list("backupStorageUuids")
    async with p.db.tx() as s:
        row = await load(s, m.Image, ctx.req("uuid"), ctx, "Image", owned=True)
    async with p.queues.serial(row.uuid):
        policy = await p.config.get("image", "deletionPolicy")
        async with p.db.tx() as s:
            await _check_bs(s, row.uuid, bs_uuids)
            for ref in await _refs(s, row.uuid, bs_uuids):
                ref.status = "Deleted"
            await s.flush()
            await _settle_image(s, row.uuid)
        if policy == "Direct":
            await expunge_image(p, row.uuid, bs_uuids)
    return {}


@api("RecoverImage")
async def recover_image(ctx: ApiContext) -> dict[str, Any]:
    """Bring back the Deleted copies on ``backupStorageUuids`` (default: all); the image is Ready."""
    p = ctx.p
    bs_uuids = ctx.list("backupStorageUuids")
    async with p.db.tx() as s:
        row = await load(s, m.Image, ctx.req("imageUuid"), ctx, "Image", owned=True)
    async with p.queues.serial(row.uuid):
        async with p.db.tx() as s:
            await _check_bs(s, row.uuid, bs_uuids)
            refs = await _refs(s, row.uuid, bs_uuids, "Deleted")
            if not refs:
                where = f" on backup storage {', '.join(bs_uuids)}" if bs_uuids else ""
                raise not_allowed(f"image {row.uuid} has no Deleted copy{where} to recover")
            for ref in refs:
                ref.status = "Ready"
            await s.flush()
            await _settle_image(s, row.uuid)
            row = await s.get(m.Image, row.uuid)
            await s.flush()
            return {"inventory": await inv(s, "QueryObjectImageInventory", row)}


@api("ExpungeImage")
async def expunge_image_api(ctx: ApiContext) -> dict[str, Any]:
    p = ctx.p
    bs_uuids = ctx.list("backupStorageUuids")
    async with p.db.tx() as s:
        row = await load(s, m.Image, ctx.req("imageUuid"), ctx, "Image", owned=True)
    async with p.queues.serial(row.uuid):
        async with p.db.tx() as s:
            await _check_bs(s, row.uuid, bs_uuids)
            if not await _refs(s, row.uuid, bs_uuids, "Deleted"):
                where = f" on backup storage {', '.join(bs_uuids)}" if bs_uuids else ""
                raise not_allowed(f"image {row.uuid} has no Deleted copy{where}; delete it first (DeleteImage)")
        await expunge_image(p, row.uuid, bs_uuids)
    return {}


async def _expunge_due(p: Platform, cutoff: datetime) -> list[str]:
    """Images with a copy Deleted before the cutoff (a copy's lastOpDate is when it was deleted)."""
    async with p.db.tx() as s:
        return list(
            (
                await s.execute(
                    select(m.ImageBackupStorageRef.imageUuid)
                    .where(m.ImageBackupStorageRef.status == "Deleted", m.ImageBackupStorageRef.lastOpDate < cutoff)
                    .distinct()
                )
            ).scalars()
        )


async def _expunge_one(p: Platform, image_uuid: str) -> None:
    period = await p.config.get("image", "expungePeriod")
    async with p.queues.serial(image_uuid):
        async with p.db.tx() as s:
            cutoff = datetime.utcnow().timestamp() - period
            due = [r.backupStorageUuid for r in await _refs(s, image_uuid, [], "Deleted")
                   if r.lastOpDate.timestamp() < cutoff]
        if due:
            await expunge_image(p, image_uuid, due)


expunger.register(expunger.Expungeable("image", _expunge_due, _expunge_one))
