"""VIPs and the Flat provider's distributed EIP (release 1.2): an EIP maps a VIP of a public L3
network onto a VM NIC's private IP, both ways, on the host the VM runs on. No virtual router:
when the VM stops the mapping goes, when it starts elsewhere it follows.

Each host gets the full set of EIPs it should serve (``/flat/eip/sync``, idempotent) whenever
that set changes: a VM with an EIP starts or stops, an EIP is attached, detached, deleted or
changes state, the host (re)connects."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, select

from nimbostack.core import hooks, query
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import ApiError, invalid, not_allowed
from nimbostack.core.hosts import agent
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
from nimbostack.core.tags import system_tags
from nimbostack.db import models as m
from nimbostack.network import flat, ipam, l2l3

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
    await sync_nic_host(ctx.p, nic)
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
    await sync_nic_host(ctx.p, nic)
    return {}


# --- EIP -----------------------------------------------------------------------------------------


async def _check_nic(s: Any, ctx: ApiContext, nic_uuid: str, vip: m.Vip, eip_uuid: str | None) -> m.VmNic:
    nic = await load(s, m.VmNic, nic_uuid, ctx, "VmNic")
    await load(s, m.VmInstance, nic.vmInstanceUuid, ctx, "VmInstance", owned=True)
    if nic.l3NetworkUuid == vip.l3NetworkUuid:
        raise invalid(f"the VIP {vip.ip} is on the NIC's own L3 network {nic.l3NetworkUuid}; an EIP needs another one")
    has_eip_service = (
        await s.execute(
            select(m.NetworkServiceL3NetworkRef.id).where(
                m.NetworkServiceL3NetworkRef.l3NetworkUuid == nic.l3NetworkUuid,
                m.NetworkServiceL3NetworkRef.networkServiceType == "Eip",
            )
        )
    ).first()
    if not has_eip_service:
        raise not_allowed(
            f"L3 network {nic.l3NetworkUuid} of NIC {nic.uuid} has no Eip service; "
            "attach one with AttachNetworkServiceToL3Network"
        )
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
        vip.useFor, vip.serviceProvider = "Eip", "Flat"
        vip.peerL3NetworkUuid = nic.l3NetworkUuid if nic else None
        s.add(row)
        await own(s, ctx, row.uuid, "EipVO")
        await add_creation_tags(s, ctx, row.uuid, "EipVO")
        await s.flush()
        out = {"inventory": await inv(s, "QueryObjectEipInventory", row)}
    await sync_nic_host(ctx.p, nic_uuid)
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
        await s.flush()
        out = {"inventory": await inv(s, "QueryObjectEipInventory", eip)}
    await sync_nic_host(ctx.p, nic.uuid)
    return out


async def _detach(p: Platform, eip_uuid: str) -> None:
    async with p.db.tx() as s:
        eip = await s.get(m.Eip, eip_uuid)
        nic_uuid, host_uuid = eip.vmNicUuid, await _nic_host(s, eip.vmNicUuid)
        vip = await s.get(m.Vip, eip.vipUuid)
        eip.vmNicUuid, eip.guestIp = None, None
        if vip is not None:
            vip.peerL3NetworkUuid = None
    if nic_uuid and host_uuid:
        await sync_host(p, host_uuid)
        await _refresh_metadata(p, nic_uuid)


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
    await sync_nic_host(ctx.p, nic)
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


# --- hosts ---------------------------------------------------------------------------------------


async def _nic_host(s: Any, nic_uuid: str | None) -> str | None:
    if not nic_uuid:
        return None
    row = (
        await s.execute(
            select(m.VmInstance.hostUuid)
            .join(m.VmNic, m.VmNic.vmInstanceUuid == m.VmInstance.uuid)
            .where(m.VmNic.uuid == nic_uuid, m.VmInstance.state.in_(flat.ACTIVE))
        )
    ).first()
    return row[0] if row else None


async def _bridge_of(s: Any, l3_uuid: str) -> tuple[str, m.L2Network]:
    l3 = await s.get(m.L3Network, l3_uuid)
    l2 = await s.get(m.L2Network, l3.l2NetworkUuid)
    return l2l3.bridge_name(l2, await system_tags(s, l2.uuid)), l2


async def desired_eips(p: Platform, host_uuid: str) -> list[dict[str, Any]]:
    """What one host should serve: enabled EIPs on NICs of VMs running there whose L3 network
    takes its Eip service from the Flat provider."""
    async with p.db.tx() as s:
        flat_eip_l3s = (
            select(m.NetworkServiceL3NetworkRef.l3NetworkUuid)
            .join(
                m.NetworkServiceProvider,
                m.NetworkServiceProvider.uuid == m.NetworkServiceL3NetworkRef.networkServiceProviderUuid,
            )
            .where(
                m.NetworkServiceProvider.type == flat.PROVIDER_TYPE,
                m.NetworkServiceL3NetworkRef.networkServiceType == "Eip",
            )
        )
        rows = (
            await s.execute(
                select(m.Eip, m.Vip, m.VmNic)
                .join(m.Vip, m.Vip.uuid == m.Eip.vipUuid)
                .join(m.VmNic, m.VmNic.uuid == m.Eip.vmNicUuid)
                .join(m.VmInstance, m.VmInstance.uuid == m.VmNic.vmInstanceUuid)
                .where(
                    m.VmInstance.hostUuid == host_uuid,
                    m.VmInstance.state.in_(flat.ACTIVE),
                    m.Eip.state == "Enabled",
                    m.Vip.state == "Enabled",
                    m.VmNic.l3NetworkUuid.in_(flat_eip_l3s),
                )
                .order_by(m.Vip.ip)
            )
        ).all()
        out = []
        for eip, vip, nic in rows:
            pub_bridge, pub_l2 = await _bridge_of(s, vip.l3NetworkUuid)
            priv_bridge, priv_l2 = await _bridge_of(s, nic.l3NetworkUuid)
            out.append(
                {
                    "eipUuid": eip.uuid,
                    "vipUuid": vip.uuid,
                    "vip": vip.ip,
                    "vipNetmask": vip.netmask,
                    "vipGateway": vip.gateway,
                    "publicBridge": pub_bridge,
                    "publicPhysicalInterface": pub_l2.physicalInterface,
                    "publicVlan": pub_l2.vlan if pub_l2.type == "L2VlanNetwork" else None,
                    "nicUuid": nic.uuid,
                    "vmIp": nic.ip,
                    "vmMac": nic.mac,
                    "privateBridge": priv_bridge,
                    "privatePhysicalInterface": priv_l2.physicalInterface,
                    "privateVlan": priv_l2.vlan if priv_l2.type == "L2VlanNetwork" else None,
                    "privateGateway": nic.gateway,
                    "privateNetmask": nic.netmask,
                }
            )
        return out


async def sync_host(p: Platform, host_uuid: str) -> None:
    async with p.queues.serial(f"flat-eip:{host_uuid}"):
        eips = await desired_eips(p, host_uuid)
        await agent(p, host_uuid, "/flat/eip/sync", {"eips": eips})


async def sync_nic_host(p: Platform, nic_uuid: str | None) -> None:
    async with p.db.tx() as s:
        host_uuid = await _nic_host(s, nic_uuid)
    if host_uuid:
        await sync_host(p, host_uuid)
        await _refresh_metadata(p, nic_uuid)


async def _refresh_metadata(p: Platform, nic_uuid: str | None) -> None:
    """public-ipv4 in the metadata follows the EIP."""
    async with p.db.tx() as s:
        nic = await s.get(m.VmNic, nic_uuid) if nic_uuid else None
    if nic is not None:
        await flat.refresh_vm(p, nic.vmInstanceUuid)


# built once (db/engine.py, "Statements built once")
_PUBLIC_IPS_ON_L3 = (
    select(m.VmNic.vmInstanceUuid, m.Eip.vipIp)
    .join(m.Eip, m.Eip.vmNicUuid == m.VmNic.uuid)
    .where(m.VmNic.l3NetworkUuid == bindparam("l3"), m.Eip.state == "Enabled")
)
_PUBLIC_IPS = _PUBLIC_IPS_ON_L3.where(m.VmNic.vmInstanceUuid.in_(bindparam("vms", expanding=True)))
# one VM's (every VM start asks): an IN list of one is rendered anew at every execution
_PUBLIC_IPS_OF_VM = _PUBLIC_IPS_ON_L3.where(m.VmNic.vmInstanceUuid == bindparam("vm"))
_VM_HAS_EIP = (
    select(m.Eip.uuid).join(m.VmNic, m.VmNic.uuid == m.Eip.vmNicUuid).where(m.VmNic.vmInstanceUuid == bindparam("vm"))
)


async def _public_ips(s: Any, l3_uuid: str, vm_uuids: list[str]) -> dict[str, dict[str, Any]]:
    if not vm_uuids:
        return {}
    if len(vm_uuids) == 1:
        rows = await s.execute(_PUBLIC_IPS_OF_VM, {"vm": vm_uuids[0], "l3": l3_uuid})
    else:
        rows = await s.execute(_PUBLIC_IPS, {"vms": vm_uuids, "l3": l3_uuid})
    return {vm: {"publicIp": ip} for vm, ip in rows}


# --- hooks ---------------------------------------------------------------------------------------


async def _vm_has_eip(p: Platform, vm_uuid: str) -> bool:
    async with p.db.tx() as s:
        return (await s.execute(_VM_HAS_EIP, {"vm": vm_uuid})).first() is not None


async def on_vm_start(p: Platform, vm_uuid: str, host_uuid: str) -> None:
    if await _vm_has_eip(p, vm_uuid):
        await sync_host(p, host_uuid)


async def on_vm_stop(p: Platform, vm_uuid: str, host_uuid: str | None) -> None:
    if host_uuid and await _vm_has_eip(p, vm_uuid):
        try:
            await sync_host(p, host_uuid)  # the VM is Stopping/Destroying: no longer in the set
        except ApiError as err:
            log.warning("VM %s stopped but its EIP stays on host %s: %s", vm_uuid, host_uuid, err)


async def on_host_connect(p: Platform, host_uuid: str) -> None:
    try:
        await sync_host(p, host_uuid)
    except ApiError as err:
        log.warning("host %s connected, but its EIPs failed: %s", host_uuid, err)


async def on_l3_changed(p: Platform, l3_uuid: str) -> None:
    """An L3 network was deleted (its VIPs and EIPs with it) or its services changed."""
    async with p.db.tx() as s:
        hosts = (await s.execute(select(m.Host.uuid).where(m.Host.status == "Connected"))).scalars().all()
    sem = asyncio.Semaphore(16)

    async def one(h: str) -> None:
        async with sem:
            try:
                await sync_host(p, h)
            except ApiError as err:
                log.warning("could not sync EIPs of host %s: %s", h, err)

    await asyncio.gather(*(one(h) for h in hosts))


hooks.on_vm_start(hooks.VmStartExtension("EIP", on_vm_start, on_vm_stop))
hooks.on_host_connect(on_host_connect)
l2l3.L3_DELETE_HOOKS.append(on_l3_changed)
l2l3.L3_SERVICE_HOOKS.append(on_l3_changed)
flat.ENTRY_EXTRAS.append(_public_ips)
