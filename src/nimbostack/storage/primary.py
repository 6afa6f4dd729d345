"""Primary storage: the APIs, and placement for the VM and volume flows. What differs between
types (LocalStorage: a share on each host; SharedMountPoint: one pool every host mounts) is in
``storage/backend.py``; this module only asks the backend of each primary storage."""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, bindparam, delete, func, select

from nimbostack.core import hooks, query
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import STORAGE_ALLOCATION_FAILED, ApiError, invalid, not_allowed
from nimbostack.core.resources import (
    ENABLE_DISABLE,
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
from nimbostack.db import models as m
from nimbostack.db.engine import Tx, columns
from nimbostack.storage import backend
from nimbostack.wire import DiskSpec

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)


async def _ps_extra(s: Tx, rows: Sequence[Any], invs: list[dict[str, Any]]) -> None:
    refs = (
        await s.execute(
            select(m.PrimaryStorageClusterRef).where(
                m.PrimaryStorageClusterRef.primaryStorageUuid.in_([r.uuid for r in rows])
            )
        )
    ).scalars()
    by: dict[str, list[str]] = {}
    for ref in refs:
        by.setdefault(ref.primaryStorageUuid, []).append(ref.clusterUuid)
    for row, out in zip(rows, invs, strict=True):
        out["attachedClusterUuids"] = by.get(row.uuid, [])


query.register(
    query.QueryTarget(
        "QueryObjectPrimaryStorageInventory",
        m.PrimaryStorage,
        "PrimaryStorageInventory",
        scope="admin",
        extra=_ps_extra,
        joins={
            "zone": query.Join("zoneUuid", "QueryObjectZoneInventory", "uuid"),
            "volume": query.Join("uuid", "QueryObjectVolumeInventory", "primaryStorageUuid"),
        },
    )
)
query.register(
    query.QueryTarget(
        "QueryObjectLocalStorageResourceRefInventory",
        m.LocalStorageResourceRef,
        scope="admin",
        joins={
            "volume": query.Join("resourceUuid", "QueryObjectVolumeInventory", "uuid"),
            "snapshot": query.Join("resourceUuid", "QueryObjectVolumeSnapshotInventory", "uuid"),
        },
    )
)
register_queries("QueryPrimaryStorage", "QueryLocalStorageResourceRef")


def directory_path(url: str) -> str:
    """A storage URL as the absolute, normalised directory path it names on the hosts."""
    if not url.startswith("/") or "\x00" in url or ".." in url.split("/"):
        raise invalid(f"url {url!r} must be an absolute directory path on the hosts")
    return posixpath.normpath(url)


async def add_primary_storage(ctx: ApiContext, ps_type: str) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        zone = await load(s, m.Zone, ctx.req("zoneUuid"), ctx, "Zone")
        path = directory_path(ctx.req("url"))
        row = m.PrimaryStorage(
            uuid=new_uuid(ctx),
            name=ctx.req("name"),
            description=ctx.str("description"),
            zoneUuid=zone.uuid,
            url=path,
            mountPath=path,
            type=ps_type,
        )
        s.add(row)
        await add_creation_tags(s, ctx, row.uuid, "PrimaryStorageVO")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectPrimaryStorageInventory", row)}


async def init_host_share(platform: Platform, ps_uuid: str, host_uuid: str, ps_type: str | None = None) -> None:
    """The host (re)connected or its cluster got the storage: the backend checks and measures it.
    ``ps_type``: the storage's type, when the caller has read it."""
    if ps_type is None:
        async with platform.db.tx() as s:
            ps_type = (
                await s.execute(select(m.PrimaryStorage.type).where(m.PrimaryStorage.uuid == ps_uuid))
            ).scalar_one()
    await backend.of(ps_type).init_host(platform, ps_uuid, host_uuid)


async def drop_host(s: Tx, host_uuid: str) -> None:
    """The host is being deleted: each backend forgets its share of the host's storages."""
    for b in backend.BACKENDS.values():
        await b.drop_host(s, host_uuid)


async def _on_host_connect(platform: Platform, host_uuid: str) -> None:
    async with platform.db.tx() as s:
        cluster = (await s.execute(select(m.Host.clusterUuid).where(m.Host.uuid == host_uuid))).scalar_one()
        ref = m.PrimaryStorageClusterRef
        storages = (
            await s.execute(
                select(m.PrimaryStorage.uuid, m.PrimaryStorage.type)
                .join(ref, m.PrimaryStorage.uuid == ref.primaryStorageUuid)
                .where(
                    ref.clusterUuid == cluster,
                    m.PrimaryStorage.type.in_(list(backend.BACKENDS)),
                )
            )
        ).all()
    for ps_uuid, ps_type in storages:
        await init_host_share(platform, ps_uuid, host_uuid, ps_type)


hooks.on_host_connect(_on_host_connect)


@api("AttachPrimaryStorageToCluster", admin=True)
async def attach_ps(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        ps = await load(s, m.PrimaryStorage, ctx.req("primaryStorageUuid"), ctx, "PrimaryStorage")
        cluster = await load(s, m.Cluster, ctx.req("clusterUuid"), ctx, "Cluster")
        if ps.zoneUuid != cluster.zoneUuid:
            raise invalid("the primary storage and the cluster are in different zones")
        if not (
            await s.execute(
                select(m.PrimaryStorageClusterRef).where(
                    m.PrimaryStorageClusterRef.primaryStorageUuid == ps.uuid,
                    m.PrimaryStorageClusterRef.clusterUuid == cluster.uuid,
                )
            )
        ).first():
            s.add(m.PrimaryStorageClusterRef(primaryStorageUuid=ps.uuid, clusterUuid=cluster.uuid))
        hosts = (
            (
                await s.execute(
                    select(m.Host.uuid).where(m.Host.clusterUuid == cluster.uuid, m.Host.status == "Connected")
                )
            )
            .scalars()
            .all()
        )
    for host_uuid in hosts:
        await init_host_share(ctx.p, ps.uuid, host_uuid)
    async with ctx.p.db.tx() as s:
        ps = await load(s, m.PrimaryStorage, ps.uuid, ctx)
        return {"inventory": await inv(s, "QueryObjectPrimaryStorageInventory", ps)}


@api("DetachPrimaryStorageFromCluster", admin=True)
async def detach_ps(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        ps = await load(s, m.PrimaryStorage, ctx.req("primaryStorageUuid"), ctx, "PrimaryStorage")
        cluster = ctx.req("clusterUuid")
        running = (
            await s.execute(
                select(func.count())
                .select_from(m.VmInstance)
                .join(m.Volume, m.Volume.uuid == m.VmInstance.rootVolumeUuid)
                .where(
                    m.Volume.primaryStorageUuid == ps.uuid,
                    m.VmInstance.clusterUuid == cluster,
                    m.VmInstance.state == "Running",
                )
            )
        ).scalar_one()
        if running:
            raise not_allowed(f"{running} running VMs of cluster {cluster} use primary storage {ps.uuid}")
        await s.execute(
            delete(m.PrimaryStorageClusterRef).where(
                m.PrimaryStorageClusterRef.primaryStorageUuid == ps.uuid,
                m.PrimaryStorageClusterRef.clusterUuid == cluster,
            )
        )
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectPrimaryStorageInventory", ps)}


@api("UpdatePrimaryStorage", admin=True)
async def update_ps(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        ps = await load(s, m.PrimaryStorage, ctx.req("uuid"), ctx, "PrimaryStorage")
        update_fields(ps, ctx)
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectPrimaryStorageInventory", ps)}


@api("ChangePrimaryStorageState", admin=True)
async def change_ps_state(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        ps = await load(s, m.PrimaryStorage, ctx.req("uuid"), ctx, "PrimaryStorage")
        ps.state = state_event(ctx.req("stateEvent"), {**ENABLE_DISABLE, "maintain": "Maintenance"})
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectPrimaryStorageInventory", ps)}


@api("DeletePrimaryStorage", admin=True)
async def delete_ps(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        ps = await load(s, m.PrimaryStorage, ctx.req("uuid"), ctx, "PrimaryStorage")
        n = (
            await s.execute(select(func.count()).select_from(m.Volume).where(m.Volume.primaryStorageUuid == ps.uuid))
        ).scalar_one()
        if n:
            raise not_allowed(f"primary storage {ps.uuid} still holds {n} volumes")
        clusters = (
            await s.execute(
                select(func.count())
                .select_from(m.PrimaryStorageClusterRef)
                .where(m.PrimaryStorageClusterRef.primaryStorageUuid == ps.uuid)
            )
        ).scalar_one()
        if clusters:
            raise not_allowed(f"primary storage {ps.uuid} is attached to {clusters} clusters; detach it first")
        await s.delete(ps)
        await disown(s, [ps.uuid])
    return {}


PS_CAPACITY_SCOPES = {
    "zoneUuids": Scope(m.Zone, "Zone", lambda uuids: m.PrimaryStorage.zoneUuid.in_(uuids)),
    # a storage attached to several of the clusters counts once
    "clusterUuids": Scope(m.Cluster, "Cluster", lambda uuids: m.PrimaryStorage.uuid.in_(
        select(m.PrimaryStorageClusterRef.primaryStorageUuid).where(m.PrimaryStorageClusterRef.clusterUuid.in_(uuids))
    )),
    "primaryStorageUuids": Scope(m.PrimaryStorage, "PrimaryStorage", lambda uuids: m.PrimaryStorage.uuid.in_(uuids)),
}


@api("GetPrimaryStorageCapacity", admin=True)
async def get_ps_capacity(ctx: ApiContext) -> dict[str, Any]:
    """Capacity of the primary storages of some zones or clusters, or named ones (or ``all``):
    what volumes and snapshots leave of it, and of the disks under it."""
    ps = m.PrimaryStorage
    total, available, total_physical, available_physical = await capacity_sums(
        ctx, PS_CAPACITY_SCOPES,
        (ps.totalCapacity, ps.availableCapacity, ps.totalPhysicalCapacity, ps.availablePhysicalCapacity),
    )
    return {"totalCapacity": total, "availableCapacity": available,
            "totalPhysicalCapacity": total_physical, "availablePhysicalCapacity": available_physical}


@api("GetPrimaryStorageTypes")
async def get_ps_types(ctx: ApiContext) -> dict[str, Any]:
    """The types of the primary storage backends loaded (each a plugin's)."""
    return {"primaryStorageTypes": list(backend.BACKENDS)}


# --- placement, used by the VM and volume flows -----------------------------------------------


# built once (db/engine.py, "Statements built once"): every VM create asks
# rows (the backends reserve by UPDATE statements)
_STORAGES_OF = (
    select(*columns(m.PrimaryStorage))
    .join(m.PrimaryStorageClusterRef, m.PrimaryStorageClusterRef.primaryStorageUuid == m.PrimaryStorage.uuid)
    .where(
        m.PrimaryStorageClusterRef.clusterUuid == bindparam("cluster"),
        m.PrimaryStorage.state == "Enabled",
    )
    .order_by(m.PrimaryStorage.availableCapacity.desc())
)
_STORAGES_OF_ONE = _STORAGES_OF.where(m.PrimaryStorage.uuid == bindparam("ps"))


async def reserve(
    s: Tx,
    cluster_uuid: str,
    host_uuid: str | None,
    size: int,
    resource_uuid: str,
    resource_type: str,
    ps_uuid: str | None = None,
) -> Row[Any]:
    """Hold ``size`` bytes for a volume or snapshot made through ``host_uuid`` on a primary storage
    attached to ``cluster_uuid`` (``ps_uuid``: that one only), inside the caller's transaction."""
    stmt = _STORAGES_OF_ONE if ps_uuid else _STORAGES_OF
    for ps in (await s.execute(stmt, {"cluster": cluster_uuid, "ps": ps_uuid})).all():
        # a storage of a type without a backend here is not used (filtered here, not by an IN list in
        # the statement: db/engine.py in_values)
        if ps.type in backend.BACKENDS and await backend.of(ps).reserve(
            s, ps, host_uuid, size, resource_uuid, resource_type
        ):
            return ps
    raise ApiError(
        STORAGE_ALLOCATION_FAILED,
        "No primary storage has enough capacity",
        f"no primary storage of host {host_uuid} has {size} bytes free",
    )


async def reserve_on_host(
    s: Tx,
    cluster_uuid: str,
    host_uuid: str,
    size: int,
    resource_uuid: str,
    resource_type: str,
    ps_uuid: str | None = None,
) -> str:
    """``reserve``, answering the primary storage's uuid."""
    return (await reserve(s, cluster_uuid, host_uuid, size, resource_uuid, resource_type, ps_uuid)).uuid


async def release(s: Tx, resource_uuid: str) -> None:
    """Give back what a volume or snapshot holds, on whichever storage; idempotent."""
    for b in backend.BACKENDS.values():
        if await b.release(s, resource_uuid):
            return


def placement(ps: m.PrimaryStorage | Row[Any], host_uuid: str | None) -> str | None:
    """Volume.hostUuid of a volume made on ``ps`` through ``host_uuid``."""
    return backend.of(ps).placement(host_uuid)


def install_path(ps: m.PrimaryStorage | Row[Any], account_uuid: str, volume_uuid: str, volume_type: str) -> str:
    """Where a new volume's file goes on the storage (its backend decides)."""
    return backend.of(ps).install_path(ps, account_uuid, volume_uuid, volume_type)


# a primary storage's type never changes: each is read once (every VM start asks, per volume)
_TYPE_OF: dict[str, str] = {}


async def disk_source(s: Tx, vol: m.Volume | Row[Any], cache: str = "none", device_id: int | None = None) -> DiskSpec:
    """How the hypervisor opens the volume, as its storage's backend says (``device_id``: the
    one it is being given, not yet recorded)."""
    kind = _TYPE_OF.get(vol.primaryStorageUuid or "")
    if kind is None:
        kind = (await s.execute(_TYPE, {"ps": vol.primaryStorageUuid})).scalar_one()
        _TYPE_OF[vol.primaryStorageUuid or ""] = kind
    return backend.of(kind).disk_source(
        vol.uuid, vol.installPath or "", vol.deviceId or 0 if device_id is None else device_id, vol.format, cache
    )


_TYPE = select(m.PrimaryStorage.type).where(m.PrimaryStorage.uuid == bindparam("ps"))


def command(ps: m.PrimaryStorage | Row[Any], name: str) -> str:
    """The agent command ``name`` of the storage's type (``/storage/local/create-root`` ...)."""
    return backend.of(ps).command(name)


async def file_host(
    s: Tx, ps: m.PrimaryStorage | Row[Any], volume_host: str | None, preferred: str | None = None
) -> str | None:
    """The host whose agent reaches a volume's files: its own host on LocalStorage; on shared
    storage the ``preferred`` host when it can, else a Connected host of an attached cluster
    (else any host of one: work for it then waits for the GC)."""
    if backend.of(ps).host_bound:
        return volume_host
    attached = select(m.PrimaryStorageClusterRef.clusterUuid).where(
        m.PrimaryStorageClusterRef.primaryStorageUuid == ps.uuid
    )
    # one host's uuid per question, not every host of the clusters: a cluster may hold thousands
    reachable = select(m.Host.uuid).where(m.Host.clusterUuid.in_(attached)).order_by(m.Host.uuid).limit(1)
    connected = reachable.where(m.Host.status == "Connected")
    for stmt in ((connected.where(m.Host.uuid == preferred),) if preferred else ()) + (connected, reachable):
        found = (await s.execute(stmt)).scalar()
        if found is not None:
            return str(found)
    return None
