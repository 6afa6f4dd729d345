"""The Flat provider's distributed EIP (release 1.2): each host maps the VIPs of the EIPs on NICs of
VMs running there onto their private IPs, both ways. No virtual router: when the VM stops the
mapping goes, when it starts elsewhere it follows.

Each host gets the full set of EIPs it should serve (``/flat/eip/sync``, idempotent) whenever
that set changes: a VM with an EIP starts or stops, an EIP is attached, detached, deleted or
changes state, the host (re)connects."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, literal, select, union_all

from nimbostack.core.errors import ApiError
from nimbostack.core.hooks import StartCommand
from nimbostack.core.hosts import agent, connected_among
from nimbostack.core.tags import system_tags
from nimbostack.db import models as m
from nimbostack.network import l2l3, providers
from nimbostack.plugins.flat import service as flat

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)


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
        flat_eip_l3s = providers.l3s_served_by(flat.PROVIDER_TYPE, "Eip")
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


async def public_ips(s: Any, l3_uuid: str, vm_uuids: list[str]) -> dict[str, dict[str, Any]]:
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


# the VM's Flat L3 networks and services, and a row marked _HAS_EIP when it has an EIP: one read
# for what every VM start needs of both
_HAS_EIP = "*eip*"
_VM_FLAT_AND_EIP = union_all(
    flat.VM_FLAT_L3S, select(literal(""), literal(_HAS_EIP)).where(_VM_HAS_EIP.exists())
)


async def on_flat_vm_start(
    p: Platform, vm_uuid: str, host_uuid: str, agent_url: str | None = None
) -> list[StartCommand]:
    """Before the VM boots: its DHCP/userdata entries on its host (for its start to carry) and, if
    it has an EIP, the host's EIP rules (a failure fails the start)."""
    async with p.db.tx() as s:
        rows = (await s.execute(_VM_FLAT_AND_EIP, {"vm": vm_uuid})).all()
    l3s: dict[str, set[str]] = defaultdict(set)
    for l3_uuid, service in rows:
        if service != _HAS_EIP:
            l3s[l3_uuid].add(service)
    has_eip = len(rows) > sum(len(v) for v in l3s.values())
    carried = []
    for l3_uuid, services in sorted(l3s.items()):
        # a VM without an EIP has no public IP to look up for its entries
        command = await flat.vm_entries(p, host_uuid, l3_uuid, services, vm_uuid, extras=None if has_eip else {})
        if command is not None:
            carried.append(command)
    if has_eip:
        await sync_host(p, host_uuid)
    return carried


async def on_flat_vm_stop(p: Platform, vm_uuid: str, host_uuid: str | None) -> None:
    """What ``on_flat_vm_start`` set up, undone: the EIP rules first (they lead to the VM), then the entries."""
    await on_vm_stop(p, vm_uuid, host_uuid)
    await flat.on_vm_stop(p, vm_uuid, host_uuid)


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


# the hosts of VMs with an EIP on a NIC of the L3 network (their EIP set follows its Eip service)
_EIP_HOSTS_OF_L3 = (
    select(m.VmInstance.hostUuid)
    .join(m.VmNic, m.VmNic.vmInstanceUuid == m.VmInstance.uuid)
    .join(m.Eip, m.Eip.vmNicUuid == m.VmNic.uuid)
    .where(m.VmNic.l3NetworkUuid == bindparam("l3"), m.VmInstance.hostUuid.is_not(None))
    .distinct()
)


async def on_l3_services_changed(p: Platform, l3_uuid: str, carrying: frozenset[str]) -> None:
    """Services attached to or detached from an L3 network: only the EIP sets of hosts with an
    EIP on a NIC of it can have changed."""
    async with p.db.tx() as s:
        with_eips = set((await s.execute(_EIP_HOSTS_OF_L3, {"l3": l3_uuid})).scalars())
    await on_l3_changed(p, l3_uuid, carrying & with_eips)


async def on_l3_changed(p: Platform, l3_uuid: str, carrying: frozenset[str]) -> None:
    """An L3 network was deleted (its VIPs and EIPs with it) or its services changed: the EIP
    set of the hosts that carry it (those of its VMs and of the VMs whose EIP's VIP is on it,
    read before a delete) is synced; no other host's EIP set can have changed."""
    hosts = [h for h, _ in await connected_among(p, carrying)] if carrying else []
    sem = asyncio.Semaphore(16)

    async def one(h: str) -> None:
        async with sem:
            try:
                await sync_host(p, h)
            except ApiError as err:
                log.warning("could not sync EIPs of host %s: %s", h, err)

    await asyncio.gather(*(one(h) for h in hosts))


class FlatEip:
    """The Eip service of the Flat provider (network/providers.py EipBackend)."""

    async def nic_changed(self, p: Platform, nic_uuid: str) -> None:
        await sync_nic_host(p, nic_uuid)


