"""Primary storage. LocalStorage: each host of the attached clusters keeps its share of the
storage under the same path; capacity is tracked per host and reserved before volumes are made."""

from __future__ import annotations

import logging
import posixpath
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select, update

from nimbostack.api.common import (
    ENABLE_DISABLE,
    add_creation_tags,
    disown,
    inv,
    load,
    new_uuid,
    register_queries,
    state_event,
    update_fields,
)
from nimbostack.api.dispatch import ApiContext, api
from nimbostack.compute import host as hostmod
from nimbostack.core.errors import STORAGE_ALLOCATION_FAILED, ApiError, invalid, not_allowed
from nimbostack.db import models as m
from nimbostack.db import query

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)


async def _ps_extra(s: Any, rows: Any, invs: list[dict[str, Any]]) -> None:
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
    query.QueryTarget("QueryObjectLocalStorageResourceRefInventory", m.LocalStorageResourceRef, scope="admin")
)
register_queries("QueryPrimaryStorage", "QueryLocalStorageResourceRef")


def _path(url: str) -> str:
    if not url.startswith("/") or "\x00" in url or ".." in url.split("/"):
        raise invalid(f"url {url!r} must be an absolute directory path on the hosts")
    return posixpath.normpath(url)


@api("AddLocalPrimaryStorage", admin=True)
async def add_local_ps(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        zone = await load(s, m.Zone, ctx.req("zoneUuid"), ctx, "Zone")
        path = _path(ctx.req("url"))
        row = m.PrimaryStorage(
            uuid=new_uuid(ctx),
            name=ctx.req("name"),
            description=ctx.str("description"),
            zoneUuid=zone.uuid,
            url=path,
            mountPath=path,
            type="LocalStorage",
        )
        s.add(row)
        await add_creation_tags(s, ctx, row.uuid, "PrimaryStorageVO")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectPrimaryStorageInventory", row)}


async def init_host_share(platform: Platform, ps_uuid: str, host_uuid: str) -> None:
    """Ask the host for its capacity under the storage path and record its share."""
    async with platform.db.tx() as s:
        ps = await s.get(m.PrimaryStorage, ps_uuid)
        host = await s.get(m.Host, host_uuid)
        assert ps is not None and host is not None
        url, path = host.agentUrl, ps.url
    reply = await platform.agents.call(url, "/storage/local/init", {"hostUuid": host_uuid, "path": path})
    async with platform.db.tx() as s:
        ref = (
            await s.execute(
                select(m.LocalStorageHostRef).where(
                    m.LocalStorageHostRef.primaryStorageUuid == ps_uuid, m.LocalStorageHostRef.hostUuid == host_uuid
                )
            )
        ).scalar_one_or_none()
        if ref is None:
            ref = m.LocalStorageHostRef(primaryStorageUuid=ps_uuid, hostUuid=host_uuid)
            s.add(ref)
        ref.totalCapacity = ref.totalPhysicalCapacity = reply["totalCapacity"]
        ref.availablePhysicalCapacity = reply["availableCapacity"]
        used = (
            await s.execute(
                select(func.coalesce(func.sum(m.LocalStorageResourceRef.size), 0)).where(
                    m.LocalStorageResourceRef.primaryStorageUuid == ps_uuid,
                    m.LocalStorageResourceRef.hostUuid == host_uuid,
                )
            )
        ).scalar_one()
        ref.availableCapacity = ref.totalCapacity - int(used)
        await s.flush()
        await _sum_capacity(s, ps_uuid)


async def _sum_capacity(s: Any, ps_uuid: str) -> None:
    total, avail, ptotal, pavail = (
        await s.execute(
            select(
                func.coalesce(func.sum(m.LocalStorageHostRef.totalCapacity), 0),
                func.coalesce(func.sum(m.LocalStorageHostRef.availableCapacity), 0),
                func.coalesce(func.sum(m.LocalStorageHostRef.totalPhysicalCapacity), 0),
                func.coalesce(func.sum(m.LocalStorageHostRef.availablePhysicalCapacity), 0),
            ).where(m.LocalStorageHostRef.primaryStorageUuid == ps_uuid)
        )
    ).one()
    await s.execute(
        update(m.PrimaryStorage)
        .where(m.PrimaryStorage.uuid == ps_uuid)
        .values(
            totalCapacity=total, availableCapacity=avail, totalPhysicalCapacity=ptotal, availablePhysicalCapacity=pavail
        )
    )


async def _on_host_connect(platform: Platform, host_uuid: str) -> None:
    async with platform.db.tx() as s:
        cluster = (await s.execute(select(m.Host.clusterUuid).where(m.Host.uuid == host_uuid))).scalar_one()
        ps_uuids = (
            (
                await s.execute(
                    select(m.PrimaryStorageClusterRef.primaryStorageUuid)
                    .join(m.PrimaryStorage, m.PrimaryStorage.uuid == m.PrimaryStorageClusterRef.primaryStorageUuid)
                    .where(m.PrimaryStorageClusterRef.clusterUuid == cluster, m.PrimaryStorage.type == "LocalStorage")
                )
            )
            .scalars()
            .all()
        )
    for ps_uuid in ps_uuids:
        await init_host_share(platform, ps_uuid, host_uuid)


hostmod.CONNECT_HOOKS.append(_on_host_connect)


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


# --- reservation, used by the VM and volume flows ----------------------------------------------


async def reserve_on_host(
    s: Any,
    cluster_uuid: str,
    host_uuid: str,
    size: int,
    resource_uuid: str,
    resource_type: str,
    ps_uuid: str | None = None,
) -> str:
    """Reserve ``size`` bytes on a LocalStorage share of ``host_uuid`` (inside the caller's
    transaction); returns the primary storage uuid."""
    stmt = (
        select(m.LocalStorageHostRef)
        .join(
            m.PrimaryStorageClusterRef,
            m.PrimaryStorageClusterRef.primaryStorageUuid == m.LocalStorageHostRef.primaryStorageUuid,
        )
        .join(m.PrimaryStorage, m.PrimaryStorage.uuid == m.LocalStorageHostRef.primaryStorageUuid)
        .where(
            m.PrimaryStorageClusterRef.clusterUuid == cluster_uuid,
            m.LocalStorageHostRef.hostUuid == host_uuid,
            m.PrimaryStorage.state == "Enabled",
            m.LocalStorageHostRef.availableCapacity >= size,
        )
    )
    if ps_uuid:
        stmt = stmt.where(m.LocalStorageHostRef.primaryStorageUuid == ps_uuid)
    ref = (await s.execute(stmt.order_by(m.LocalStorageHostRef.availableCapacity.desc()).limit(1))).scalar_one_or_none()
    if ref is None:
        raise ApiError(
            STORAGE_ALLOCATION_FAILED,
            "No primary storage has enough capacity",
            f"no primary storage of host {host_uuid} has {size} bytes free",
        )
    ref.availableCapacity -= size
    await s.execute(
        update(m.PrimaryStorage)
        .where(m.PrimaryStorage.uuid == ref.primaryStorageUuid)
        .values(availableCapacity=m.PrimaryStorage.availableCapacity - size)
    )
    s.add(
        m.LocalStorageResourceRef(
            resourceUuid=resource_uuid,
            primaryStorageUuid=ref.primaryStorageUuid,
            hostUuid=host_uuid,
            size=size,
            resourceType=resource_type,
        )
    )
    return ref.primaryStorageUuid


async def release(s: Any, resource_uuid: str) -> None:
    ref = await s.get(m.LocalStorageResourceRef, resource_uuid)
    if ref is None:
        return
    await s.execute(
        update(m.LocalStorageHostRef)
        .where(
            m.LocalStorageHostRef.primaryStorageUuid == ref.primaryStorageUuid,
            m.LocalStorageHostRef.hostUuid == ref.hostUuid,
        )
        .values(availableCapacity=m.LocalStorageHostRef.availableCapacity + ref.size)
    )
    await s.execute(
        update(m.PrimaryStorage)
        .where(m.PrimaryStorage.uuid == ref.primaryStorageUuid)
        .values(availableCapacity=m.PrimaryStorage.availableCapacity + ref.size)
    )
    await s.delete(ref)
