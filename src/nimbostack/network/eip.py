"""VIPs and EIPs (release 1.2): an EIP maps a VIP of a public L3 network onto a VM NIC's private IP.
Who makes it so is the provider attached to the NIC's L3 network for the Eip service
(network/providers.py): the Flat plugin on the VM's host, a virtual router in its appliance."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from nimbostack.core import query
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import invalid, not_allowed
from nimbostack.core.resources import (
    ENABLE_DISABLE,
    add_creation_tags,
    disown,
    inv,
    load,
    new_uuid,
    own,
    register_queries,
    state_event,
    update_fields,
)
from nimbostack.db import models as m
from nimbostack.network import ipam, providers

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

query.register(
    query.QueryTarget(
        "QueryObjectVipInventory",
        m.Vip,
        scope="owned",
        joins={
            "eip": query.Join("uuid", "QueryObjectEipInventory", "vipUuid"),
            "l3Network": query.Join("l3NetworkUuid", "QueryObjectL3NetworkInventory", "uuid"),
        },
    )
)
query.register(
    query.QueryTarget(
        "QueryObjectEipInventory",
        m.Eip,
        scope="owned",
        joins={
            "vip": query.Join("vipUuid", "QueryObjectVipInventory", "uuid"),
            "vmNic": query.Join("vmNicUuid", "QueryObjectVmNicInventory", "uuid"),
        },
    )
)
register_queries("QueryVip", "QueryEip")


# --- VIP -----------------------------------------------------------------------------------------


@api("CreateVip")
async def create_vip(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        l3 = await load(s, m.L3Network, ctx.req("l3NetworkUuid"), ctx, "L3Network")
        if l3.state != "Enabled":
            raise not_allowed(f"L3 network {l3.uuid} is {l3.state}")
        used = await ipam.allocate(s, l3.uuid, ctx.str("requiredIp"), used_for="Vip")
        row = m.Vip(
            uuid=new_uuid(ctx),
            name=ctx.req("name"),
            description=ctx.str("description"),
            l3NetworkUuid=l3.uuid,
            ip=used.ip,
            netmask=used.netmask,
            gateway=used.gateway,
            usedIpUuid=used.uuid,
        )
        s.add(row)
        await own(s, ctx, row.uuid, "VipVO")
        await add_creation_tags(s, ctx, row.uuid, "VipVO")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectVipInventory", row)}


@api("UpdateVip")
async def update_vip(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.Vip, ctx.req("uuid"), ctx, "Vip", owned=True)
        update_fields(row, ctx)
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectVipInventory", row)}


@api("ChangeVipState")
async def change_vip_state(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.Vip, ctx.req("uuid"), ctx, "Vip", owned=True)
        row.state = state_event(ctx.req("stateEvent"), ENABLE_DISABLE)
        eip = (await s.execute(select(m.Eip).where(m.Eip.vipUuid == row.uuid))).scalar_one_or_none()
        nic = eip.vmNicUuid if eip else None
        await s.flush()
        out = {"inventory": await inv(s, "QueryObjectVipInventory", row)}
    await _nic_changed(ctx.p, nic)
    return out


@api("DeleteVip")
async def delete_vip(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.Vip, ctx.req("uuid"), ctx, "Vip", owned=True)
        eip = (await s.execute(select(m.Eip).where(m.Eip.vipUuid == row.uuid))).scalar_one_or_none()
        nic = eip.vmNicUuid if eip else None
        if eip is not None:
            await s.delete(eip)
            await disown(s, [eip.uuid])
        if row.usedIpUuid:
            await ipam.release(s, [row.usedIpUuid])
        await s.delete(row)
        await disown(s, [row.uuid])
    await _nic_changed(ctx.p, nic)
    return {}


# --- EIP -----------------------------------------------------------------------------------------


async def _check_nic(s: Any, ctx: ApiContext, nic_uuid: str, vip: m.Vip, eip_uuid: str | None) -> m.VmNic:
    nic = await load(s, m.VmNic, nic_uuid, ctx, "VmNic")
    await load(s, m.VmInstance, nic.vmInstanceUuid, ctx, "VmInstance", owned=True)
    if nic.l3NetworkUuid == vip.l3NetworkUuid:
        raise invalid(f"the VIP {vip.ip} is on the NIC's own L3 network {nic.l3NetworkUuid}; an EIP needs another one")
    provider = await providers.provider_for(s, nic.l3NetworkUuid, "Eip")
    if provider is None:
        raise not_allowed(
            f"L3 network {nic.l3NetworkUuid} of NIC {nic.uuid} has no Eip service; "
            "attach one with AttachNetworkServiceToL3Network"
        )
    if provider.eip is None:
        raise not_allowed(f"the {provider.type} provider of L3 network {nic.l3NetworkUuid} cannot serve an EIP yet")
    other = (
        await s.execute(select(m.Eip.uuid).where(m.Eip.vmNicUuid == nic.uuid, m.Eip.uuid != (eip_uuid or "")))
    ).first()
    if other:
        raise not_allowed(f"NIC {nic.uuid} already has EIP {other[0]}")
    return nic


@api("CreateEip")
async def create_eip(ctx: ApiContext) -> dict[str, Any]:
    uuid = new_uuid(ctx)
    nic_uuid = ctx.str("vmNicUuid")
    async with ctx.p.db.tx() as s:
        vip = await load(s, m.Vip, ctx.req("vipUuid"), ctx, "Vip", owned=True)
        if vip.useFor or (await s.execute(select(m.Eip.uuid).where(m.Eip.vipUuid == vip.uuid))).first():
            raise not_allowed(f"VIP {vip.uuid} is already used for {vip.useFor or 'Eip'}")
        nic = await _check_nic(s, ctx, nic_uuid, vip, uuid) if nic_uuid else None
        row = m.Eip(
            uuid=uuid,
            name=ctx.req("name"),
            description=ctx.str("description"),
            vipUuid=vip.uuid,
            vipIp=vip.ip,
            vmNicUuid=nic.uuid if nic else None,
            guestIp=nic.ip if nic else None,
        )
        vip.useFor = "Eip"
        vip.serviceProvider = await providers.attached_type(s, nic.l3NetworkUuid, "Eip") if nic else None
        vip.peerL3NetworkUuid = nic.l3NetworkUuid if nic else None
        s.add(row)
        await own(s, ctx, row.uuid, "EipVO")
        await add_creation_tags(s, ctx, row.uuid, "EipVO")
        await s.flush()
        out = {"inventory": await inv(s, "QueryObjectEipInventory", row)}
    await _nic_changed(ctx.p, nic_uuid)
    return out


@api("AttachEip")
async def attach_eip(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        eip = await load(s, m.Eip, ctx.req("eipUuid"), ctx, "Eip", owned=True)
        if eip.vmNicUuid:
            raise not_allowed(f"EIP {eip.uuid} is attached to NIC {eip.vmNicUuid}; detach it first")
        vip = await s.get(m.Vip, eip.vipUuid)
        nic = await _check_nic(s, ctx, ctx.req("vmNicUuid"), vip, eip.uuid)
        eip.vmNicUuid, eip.guestIp, vip.peerL3NetworkUuid = nic.uuid, nic.ip, nic.l3NetworkUuid
        vip.serviceProvider = await providers.attached_type(s, nic.l3NetworkUuid, "Eip")
        await s.flush()
        out = {"inventory": await inv(s, "QueryObjectEipInventory", eip)}
    await _nic_changed(ctx.p, nic.uuid)
    return out


async def _detach(p: Platform, eip_uuid: str) -> None:
    async with p.db.tx() as s:
        eip = await s.get(m.Eip, eip_uuid)
        nic_uuid = eip.vmNicUuid
        serving = await _provider_of_nic(s, nic_uuid)
        vip = await s.get(m.Vip, eip.vipUuid)
        eip.vmNicUuid, eip.guestIp = None, None
        if vip is not None:
            vip.peerL3NetworkUuid = None
    if nic_uuid and serving is not None and serving.eip is not None:
        await serving.eip.nic_changed(p, nic_uuid)


@api("DetachEip")
async def detach_eip(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        eip = await load(s, m.Eip, ctx.req("uuid"), ctx, "Eip", owned=True)
    await _detach(ctx.p, eip.uuid)
    async with ctx.p.db.tx() as s:
        return {"inventory": await inv(s, "QueryObjectEipInventory", await s.get(m.Eip, eip.uuid))}


@api("DeleteEip")
async def delete_eip(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        eip = await load(s, m.Eip, ctx.req("uuid"), ctx, "Eip", owned=True)
    await _detach(ctx.p, eip.uuid)
    async with ctx.p.db.tx() as s:
        row = await s.get(m.Eip, eip.uuid)
        vip = await s.get(m.Vip, row.vipUuid)
        if vip is not None:
            vip.useFor, vip.serviceProvider = None, None
        await s.delete(row)
        await disown(s, [row.uuid])
    return {}


@api("UpdateEip")
async def update_eip(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.Eip, ctx.req("uuid"), ctx, "Eip", owned=True)
        update_fields(row, ctx)
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectEipInventory", row)}


@api("ChangeEipState")
async def change_eip_state(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.Eip, ctx.req("uuid"), ctx, "Eip", owned=True)
        row.state = state_event(ctx.req("stateEvent"), ENABLE_DISABLE)
        nic = row.vmNicUuid
        await s.flush()
        out = {"inventory": await inv(s, "QueryObjectEipInventory", row)}
    await _nic_changed(ctx.p, nic)
    return out


@api("GetEipAttachableVmNics")
async def attachable_nics(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        vip_uuid = ctx.str("vipUuid")
        if not vip_uuid:
            vip_uuid = (await load(s, m.Eip, ctx.req("eipUuid"), ctx, "Eip", owned=True)).vipUuid
        vip = await load(s, m.Vip, vip_uuid, ctx, "Vip", owned=True)
        l3s = select(m.NetworkServiceL3NetworkRef.l3NetworkUuid).where(
            m.NetworkServiceL3NetworkRef.networkServiceType == "Eip"
        )
        taken = select(m.Eip.vmNicUuid).where(m.Eip.vmNicUuid.is_not(None))
        nics = (
            (
                await s.execute(
                    select(m.VmNic)
                    .join(m.VmInstance, m.VmInstance.uuid == m.VmNic.vmInstanceUuid)
                    .where(
                        m.VmNic.l3NetworkUuid.in_(l3s),
                        m.VmNic.l3NetworkUuid != vip.l3NetworkUuid,
                        m.VmNic.uuid.not_in(taken),
                        m.VmInstance.state.in_(("Running", "Stopped")),
                    )
                )
            )
            .scalars()
            .all()
        )
        return {"inventories": [await inv(s, "QueryObjectVmNicInventory", n) for n in nics]}


# --- the provider ----------------------------------------------------------------------------


async def _provider_of_nic(s: AsyncSession, nic_uuid: str | None) -> providers.ServiceProvider | None:
    nic = await s.get(m.VmNic, nic_uuid) if nic_uuid else None
    return await providers.provider_for(s, nic.l3NetworkUuid, "Eip") if nic is not None else None


async def _nic_changed(p: Platform, nic_uuid: str | None) -> None:
    """Tell the provider serving the NIC's Eip service that the NIC's EIP changed."""
    async with p.db.tx() as s:
        serving = await _provider_of_nic(s, nic_uuid)
    if nic_uuid and serving is not None and serving.eip is not None:
        await serving.eip.nic_changed(p, nic_uuid)
