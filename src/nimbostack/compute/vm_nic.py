"""A VM's NICs after its creation: attaching and detaching L3 networks (a NIC hot-plugged into a
running guest), the networks it may take, and static IPs."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select

from nimbostack.compute.allocator import new_mac
from nimbostack.compute.vm import STATIC_IP_PREFIX, need_state, static_ips, vm_for, vm_inv
from nimbostack.compute.vmspec import nic_spec
from nimbostack.core import deadline, hooks
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import RESOURCE_NOT_FOUND, ApiError, not_allowed, not_found
from nimbostack.core.flow import until_stored
from nimbostack.core.hosts import agent
from nimbostack.core.resources import add_tags, inv, load, new_uuid, visible_clause
from nimbostack.db import models as m
from nimbostack.db.engine import Tx, insert_now
from nimbostack.network import ipam
from nimbostack.wire import NicSpec

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

# the states in which a VM's NICs change: a running guest gets the NIC hot-plugged, a stopped
# one at its next start; any other state is on its way somewhere and is refused
NIC_CHANGE_STATES = ("Running", "Stopped")


async def _check_attachable(s: Tx, vm: m.VmInstance, l3: m.L3Network) -> None:
    if l3.state != "Enabled":
        raise not_allowed(f"L3 network {l3.uuid} is {l3.state}")
    if l3.system and vm.type == "UserVm":
        raise not_allowed(f"L3 network {l3.uuid} is a system network; only appliance VMs join it")
    if vm.zoneUuid and l3.zoneUuid != vm.zoneUuid:
        raise not_allowed(f"L3 network {l3.uuid} is in zone {l3.zoneUuid}, VM {vm.uuid} in zone {vm.zoneUuid}")
    on = (
        await s.execute(select(m.VmNic.uuid).where(m.VmNic.vmInstanceUuid == vm.uuid, m.VmNic.l3NetworkUuid == l3.uuid))
    ).first()
    if on is not None:
        raise not_allowed(f"VM {vm.uuid} already has a NIC on L3 network {l3.uuid}")
    reaches = select(m.L2NetworkClusterRef.id).where(
        m.L2NetworkClusterRef.l2NetworkUuid == l3.l2NetworkUuid, m.L2NetworkClusterRef.clusterUuid == vm.clusterUuid
    )
    if vm.clusterUuid and (await s.execute(reaches)).first() is None:
        raise not_allowed(
            f"L3 network {l3.uuid}'s L2 network {l3.l2NetworkUuid} is not attached to VM {vm.uuid}'s "
            f"cluster {vm.clusterUuid}"
        )


@api("GetVmAttachableL3Network")
async def attachable_l3_networks(ctx: ApiContext) -> dict[str, Any]:
    """The L3 networks the VM may join: enabled, not system, in its zone, on an L2 network its
    cluster reaches, not joined yet, and the caller's own or shared (the admin's)."""
    vm = await vm_for(ctx, ctx.req("vmInstanceUuid"))
    if vm.state not in NIC_CHANGE_STATES:
        return {"inventories": []}
    where = [
        m.L3Network.state == "Enabled",
        m.L3Network.system.is_(False),
        m.L3Network.uuid.not_in(select(m.VmNic.l3NetworkUuid).where(m.VmNic.vmInstanceUuid == vm.uuid)),
        *visible_clause(ctx.caller, m.L3Network.uuid),
    ]
    if vm.zoneUuid:
        where.append(m.L3Network.zoneUuid == vm.zoneUuid)
    if vm.clusterUuid:
        where.append(
            m.L3Network.l2NetworkUuid.in_(
                select(m.L2NetworkClusterRef.l2NetworkUuid).where(m.L2NetworkClusterRef.clusterUuid == vm.clusterUuid)
            )
        )
    async with ctx.p.db.tx() as s:
        rows = (await s.execute(select(m.L3Network).where(*where).order_by(m.L3Network.createDate))).scalars().all()
        return {"inventories": [await inv(s, "QueryObjectL3NetworkInventory", r) for r in rows]}


@api("AttachL3NetworkToVm")
async def attach_l3_network(ctx: ApiContext) -> dict[str, Any]:
    """A new NIC on the L3 network with an IP from it (``staticIp`` if given, kept as the VM's
    ``staticIp::`` tag). A running VM's host serves the NIC's DHCP entry, then the agent plugs
    it into the guest; on any failure the NIC, its IP and its entry go again."""
    p = ctx.p
    vm = await vm_for(ctx, ctx.req("vmInstanceUuid"))
    async with p.db.tx() as s:
        l3 = await load(s, m.L3Network, ctx.req("l3NetworkUuid"), ctx, "L3Network")
    wanted_ip = ctx.str("staticIp")
    async with p.queues.serial(vm.uuid):
        vm = await vm_for(ctx, vm.uuid)
        need_state(vm, *NIC_CHANGE_STATES)
        nic_uuid = new_uuid()
        async with p.db.tx() as s:
            await _check_attachable(s, vm, l3)
            wanted_ip = wanted_ip or (await static_ips(s, vm.uuid)).get(l3.uuid)
            used = await ipam.allocate(s, l3.uuid, wanted_ip)
            taken = set((await s.execute(select(m.VmNic.deviceId).where(m.VmNic.vmInstanceUuid == vm.uuid))).scalars())
            await insert_now(
                s,
                m.VmNic(
                    uuid=nic_uuid,
                    vmInstanceUuid=vm.uuid,
                    l3NetworkUuid=l3.uuid,
                    ip=used.ip,
                    mac=new_mac(),
                    netmask=used.netmask,
                    gateway=used.gateway,
                    deviceId=next(i for i in range(len(taken) + 1) if i not in taken),
                    usedIpUuid=used.uuid,
                ),
            )
            if ctx.str("staticIp"):
                await _drop_static_ip(s, vm.uuid, l3.uuid)
                await add_tags(s, vm.uuid, "VmInstanceVO", [f"{STATIC_IP_PREFIX}{l3.uuid}::{used.ip}"], [])
            if not vm.defaultL3NetworkUuid:
                row = await s.get(m.VmInstance, vm.uuid)
                row.defaultL3NetworkUuid = l3.uuid
        if vm.state == "Running":
            await _plug(p, vm, l3.uuid, nic_uuid, bool(ctx.str("staticIp")))
    return await vm_inv(ctx, vm.uuid)


async def _plug(p: Platform, vm: m.VmInstance, l3_uuid: str, nic_uuid: str, new_tag: bool) -> None:
    spec: NicSpec | None = None
    try:
        async with p.db.tx() as s:
            spec = await nic_spec(s, nic_uuid)
        await hooks.nic_changed(p, vm.uuid, vm.hostUuid, l3_uuid)
        await agent(p, vm.hostUuid, "/vm/attach-nic", {"vmUuid": vm.uuid, "nic": asdict(spec)})
    except BaseException:
        with deadline.grace():  # the API's own may be spent by now
            async def forget() -> None:
                async with p.db.tx() as s:
                    await _remove_nic(s, vm, nic_uuid, l3_uuid, drop_static_ip=new_tag)

            await until_stored(forget)
            if spec is not None:
                try:
                    # the agent may have plugged it before its answer was lost; unplugging a NIC
                    # that is not there is no error
                    await agent(p, vm.hostUuid, "/vm/detach-nic", {"vmUuid": vm.uuid, "nic": asdict(spec)})
                except ApiError as err:
                    log.warning("VM %s: NIC %s not unplugged after its failed attach: %s", vm.uuid, nic_uuid, err)
            try:
                await hooks.nic_changed(p, vm.uuid, vm.hostUuid, l3_uuid)
            except ApiError as err:
                log.warning("VM %s: the entry of NIC %s stays on host %s: %s", vm.uuid, nic_uuid, vm.hostUuid, err)
        raise


async def _drop_static_ip(s: Tx, vm_uuid: str, l3_uuid: str) -> None:
    await s.execute(
        delete(m.SystemTag).where(
            m.SystemTag.resourceUuid == vm_uuid, m.SystemTag.tag.startswith(f"{STATIC_IP_PREFIX}{l3_uuid}::")
        )
    )


async def _remove_nic(
    s: Tx, vm: m.VmInstance, nic_uuid: str, l3_uuid: str, drop_static_ip: bool = True
) -> str | None:
    """The NIC's row and IP go; the VM's default network moves to its first NIC left (none: none).
    Returns the new default network when it moved to another one."""
    nic = await s.get(m.VmNic, nic_uuid)
    if nic is None:
        return None
    await ipam.release(s, [nic.usedIpUuid] if nic.usedIpUuid else [])
    await s.delete(nic)
    if drop_static_ip:
        await _drop_static_ip(s, vm.uuid, l3_uuid)
    row = await s.get(m.VmInstance, vm.uuid)
    if row is not None and row.defaultL3NetworkUuid == l3_uuid:
        await s.flush()
        left = (
            await s.execute(
                select(m.VmNic.l3NetworkUuid).where(m.VmNic.vmInstanceUuid == vm.uuid).order_by(m.VmNic.deviceId)
            )
        ).first()
        row.defaultL3NetworkUuid = left[0] if left else None
        return row.defaultL3NetworkUuid
    return None


async def _nic_of(ctx: ApiContext, nic_uuid: str) -> tuple[m.VmNic, m.VmInstance]:
    """The NIC and its VM, which the caller must own: another account's NIC is not found."""
    async with ctx.p.db.tx() as s:
        nic = await load(s, m.VmNic, nic_uuid, ctx, "VmNic")
    try:
        vm = await vm_for(ctx, nic.vmInstanceUuid)
    except ApiError as err:
        if err.code == RESOURCE_NOT_FOUND:
            raise not_found("VmNic", nic_uuid) from None
        raise
    return nic, vm


@api("DetachL3NetworkFromVm")
async def detach_l3_network(ctx: ApiContext) -> dict[str, Any]:
    """The agent unplugs the NIC from a running guest first; then its row, IP and ``staticIp::``
    tag go and the host stops serving its DHCP entry. A NIC with an EIP keeps it: detach that first."""
    p = ctx.p
    nic, vm = await _nic_of(ctx, ctx.req("vmNicUuid"))
    async with p.queues.serial(vm.uuid):
        nic, vm = await _nic_of(ctx, nic.uuid)
        need_state(vm, *NIC_CHANGE_STATES)
        async with p.db.tx() as s:
            eip = (await s.execute(select(m.Eip.uuid).where(m.Eip.vmNicUuid == nic.uuid))).first()
            if eip is not None:
                raise not_allowed(f"NIC {nic.uuid} has EIP {eip[0]}; detach the EIP from it first (DetachEip)")
            spec = await nic_spec(s, nic.uuid)
        if vm.state == "Running":
            await agent(p, vm.hostUuid, "/vm/detach-nic", {"vmUuid": vm.uuid, "nic": asdict(spec)})
        async with p.db.tx() as s:
            new_default = await _remove_nic(s, vm, nic.uuid, nic.l3NetworkUuid)
        if vm.state == "Running":
            # the new default network's lease now carries the guest's default route
            for l3_uuid in filter(None, (nic.l3NetworkUuid, new_default)):
                try:
                    await hooks.nic_changed(p, vm.uuid, vm.hostUuid, l3_uuid)
                except ApiError as err:  # the NIC is out of the guest already: its stale lease harms no one
                    log.warning("VM %s: the DHCP entries of L3 %s on host %s stay as they were until it "
                                "reconnects: %s", vm.uuid, l3_uuid, vm.hostUuid, err)
    return await vm_inv(ctx, vm.uuid)


@api("SetVmStaticIp")
async def set_static_ip(ctx: ApiContext) -> dict[str, Any]:
    """The VM's NIC on the L3 network takes this IP from now on (the old one is given back), kept
    as its ``staticIp::`` tag for a recovery. A running guest would keep its old lease until it
    renews: the VM must be stopped (it gets the new address at its next start)."""
    p = ctx.p
    vm = await vm_for(ctx, ctx.req("vmInstanceUuid"))
    l3_uuid, ip = ctx.req("l3NetworkUuid"), ctx.req("ip")
    async with p.queues.serial(vm.uuid):
        vm = await vm_for(ctx, vm.uuid)
        need_state(vm, "Stopped")
        async with p.db.tx() as s:
            await load(s, m.L3Network, l3_uuid, ctx, "L3Network")
            mine = select(m.VmNic).where(m.VmNic.vmInstanceUuid == vm.uuid, m.VmNic.l3NetworkUuid == l3_uuid)
            nic = (await s.execute(mine)).scalar_one_or_none()
            if nic is None:
                raise not_allowed(f"VM {vm.uuid} has no NIC on L3 network {l3_uuid}; AttachL3NetworkToVm first")
            if nic.ip != ip:
                used = await ipam.allocate(s, l3_uuid, ip)
                await ipam.release(s, [nic.usedIpUuid] if nic.usedIpUuid else [])
                nic.ip, nic.netmask, nic.gateway, nic.usedIpUuid = used.ip, used.netmask, used.gateway, used.uuid
            await _drop_static_ip(s, vm.uuid, l3_uuid)
            await add_tags(s, vm.uuid, "VmInstanceVO", [f"{STATIC_IP_PREFIX}{l3_uuid}::{nic.ip}"], [])
    return await vm_inv(ctx, vm.uuid)


@api("DeleteVmStaticIp")
async def delete_static_ip(ctx: ApiContext) -> dict[str, Any]:
    """The VM's static IP on the L3 network is forgotten; its NIC keeps the address it has."""
    vm = await vm_for(ctx, ctx.req("vmInstanceUuid"))
    async with ctx.p.queues.serial(vm.uuid):
        async with ctx.p.db.tx() as s:
            await _drop_static_ip(s, vm.uuid, ctx.req("l3NetworkUuid"))
    return {}
