"""Zones, clusters and offerings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select

from nimbostack.core import query
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import not_allowed
from nimbostack.core.resources import (
    ENABLE_DISABLE,
    add_creation_tags,
    inv,
    load,
    new_uuid,
    register_queries,
    state_event,
    update_fields,
)
from nimbostack.db import models as m

query.register(query.QueryTarget("QueryObjectZoneInventory", m.Zone, "ZoneInventory", scope="public"))
query.register(
    query.QueryTarget(
        "QueryObjectClusterInventory",
        m.Cluster,
        "ClusterInventory",
        scope="admin",
        joins={
            "zone": query.Join("zoneUuid", "QueryObjectZoneInventory", "uuid"),
            "host": query.Join("uuid", "QueryObjectHostInventory", "clusterUuid"),
        },
    )
)
query.register(
    query.QueryTarget(
        "QueryObjectInstanceOfferingInventory", m.InstanceOffering, "InstanceOfferingInventory", scope="public"
    )
)
query.register(
    query.QueryTarget("QueryObjectDiskOfferingInventory", m.DiskOffering, "DiskOfferingInventory", scope="public")
)
register_queries("QueryZone", "QueryCluster", "QueryInstanceOffering", "QueryDiskOffering")


@api("CreateZone", admin=True)
async def create_zone(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = m.Zone(
            uuid=new_uuid(ctx), name=ctx.req("name"), description=ctx.str("description"), type=ctx.str("type", "zstack")
        )
        s.add(row)
        await add_creation_tags(s, ctx, row.uuid, "ZoneVO")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectZoneInventory", row)}


@api("UpdateZone", admin=True)
async def update_zone(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.Zone, ctx.req("uuid"), ctx, "Zone")
        update_fields(row, ctx)
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectZoneInventory", row)}


@api("ChangeZoneState", admin=True)
async def change_zone_state(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.Zone, ctx.req("uuid"), ctx, "Zone")
        row.state = state_event(ctx.req("stateEvent"), ENABLE_DISABLE)
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectZoneInventory", row)}


async def _refuse_if_used(s: Any, what: str, uuid: str, *checks: tuple[Any, Any, str]) -> None:
    for model, column, label in checks:
        n = (await s.execute(select(func.count()).select_from(model).where(column == uuid))).scalar_one()
        if n:
            raise not_allowed(f"{what} {uuid} still has {n} {label}; delete them first")


@api("DeleteZone", admin=True)
async def delete_zone(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.Zone, ctx.req("uuid"), ctx, "Zone")
        await _refuse_if_used(
            s,
            "zone",
            row.uuid,
            (m.Cluster, m.Cluster.zoneUuid, "clusters"),
            (m.PrimaryStorage, m.PrimaryStorage.zoneUuid, "primary storages"),
            (m.L2Network, m.L2Network.zoneUuid, "L2 networks"),
        )
        await s.delete(row)
    return {}


@api("CreateCluster", admin=True)
async def create_cluster(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        zone = await load(s, m.Zone, ctx.req("zoneUuid"), ctx, "Zone")
        row = m.Cluster(
            uuid=new_uuid(ctx),
            name=ctx.req("name"),
            description=ctx.str("description"),
            zoneUuid=zone.uuid,
            hypervisorType=ctx.req("hypervisorType"),
            type=ctx.str("type", "zstack"),
        )
        s.add(row)
        await add_creation_tags(s, ctx, row.uuid, "ClusterVO")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectClusterInventory", row)}


@api("UpdateCluster", admin=True)
async def update_cluster(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.Cluster, ctx.req("uuid"), ctx, "Cluster")
        update_fields(row, ctx)
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectClusterInventory", row)}


@api("ChangeClusterState", admin=True)
async def change_cluster_state(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.Cluster, ctx.req("uuid"), ctx, "Cluster")
        row.state = state_event(ctx.req("stateEvent"), ENABLE_DISABLE)
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectClusterInventory", row)}


@api("DeleteCluster", admin=True)
async def delete_cluster(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.Cluster, ctx.req("uuid"), ctx, "Cluster")
        await _refuse_if_used(
            s,
            "cluster",
            row.uuid,
            (m.Host, m.Host.clusterUuid, "hosts"),
            (m.VmInstance, m.VmInstance.clusterUuid, "VMs"),
        )
        await s.delete(row)
    return {}


@api("CreateInstanceOffering", admin=True)
async def create_instance_offering(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = m.InstanceOffering(
            uuid=new_uuid(ctx),
            name=ctx.req("name"),
            description=ctx.str("description"),
            cpuNum=ctx.int("cpuNum", minimum=1),
            cpuSpeed=ctx.int("cpuSpeed", minimum=1),
            memorySize=ctx.int("memorySize", minimum=16 << 20),
            sortKey=ctx.int("sortKey", 0),
            allocatorStrategy=ctx.str("allocatorStrategy", "DefaultHostAllocatorStrategy"),
            type=ctx.str("type", "UserVm"),
        )
        s.add(row)
        await add_creation_tags(s, ctx, row.uuid, "InstanceOfferingVO")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectInstanceOfferingInventory", row)}


@api("CreateDiskOffering", admin=True)
async def create_disk_offering(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = m.DiskOffering(
            uuid=new_uuid(ctx),
            name=ctx.req("name"),
            description=ctx.str("description"),
            diskSize=ctx.int("diskSize", minimum=1 << 20),
            sortKey=ctx.int("sortKey", 0),
            type=ctx.str("type", "zstack"),
        )
        s.add(row)
        await add_creation_tags(s, ctx, row.uuid, "DiskOfferingVO")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectDiskOfferingInventory", row)}


async def _delete_offering(ctx: ApiContext, model: type, kind: str) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, model, ctx.req("uuid"), ctx, kind)
        await s.delete(row)
    return {}


@api("DeleteInstanceOffering", admin=True)
async def delete_instance_offering(ctx: ApiContext) -> dict[str, Any]:
    return await _delete_offering(ctx, m.InstanceOffering, "InstanceOffering")


@api("DeleteDiskOffering", admin=True)
async def delete_disk_offering(ctx: ApiContext) -> dict[str, Any]:
    return await _delete_offering(ctx, m.DiskOffering, "DiskOffering")


async def _change_offering(
    ctx: ApiContext, model: type, kind: str, change: Callable[[Any], None]
) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, model, ctx.req("uuid"), ctx, kind)
        change(row)
        await s.flush()
        return {"inventory": await inv(s, f"QueryObject{kind}Inventory", row)}


def _new_state(ctx: ApiContext) -> Callable[[Any], None]:
    state = state_event(ctx.req("stateEvent"), ENABLE_DISABLE)
    return lambda row: setattr(row, "state", state)


@api("ChangeInstanceOfferingState", admin=True)
async def change_instance_offering_state(ctx: ApiContext) -> dict[str, Any]:
    """A Disabled offering makes no new VM; the VMs made from it keep running."""
    return await _change_offering(ctx, m.InstanceOffering, "InstanceOffering", _new_state(ctx))


@api("ChangeDiskOfferingState", admin=True)
async def change_disk_offering_state(ctx: ApiContext) -> dict[str, Any]:
    """A Disabled offering makes no new volume; the volumes made from it stay."""
    return await _change_offering(ctx, m.DiskOffering, "DiskOffering", _new_state(ctx))


@api("UpdateInstanceOffering", admin=True)
async def update_instance_offering(ctx: ApiContext) -> dict[str, Any]:
    return await _change_offering(ctx, m.InstanceOffering, "InstanceOffering", lambda row: update_fields(row, ctx))


@api("UpdateDiskOffering", admin=True)
async def update_disk_offering(ctx: ApiContext) -> dict[str, Any]:
    return await _change_offering(ctx, m.DiskOffering, "DiskOffering", lambda row: update_fields(row, ctx))
