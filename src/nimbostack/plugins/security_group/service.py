"""What each host enforces for security groups, and pushing it there (``/sg/apply``).

A NIC is filtered when it is in at least one group that is Enabled, attached to the NIC's L3
network, on an L3 network that takes the SecurityGroup service from a SecurityGroup provider. Its
rules are the Enabled rules of all such groups. Hosts hear of it:

* before a VM starts (a VM start extension) and when it stops, is destroyed or leaves the host
  (its release): the VM's chains, and only when the VM is in a group (the VM start hot path
  pays one indexed read otherwise);
* when rules, membership, a group's state or its L3 networks change (``push_nics``): each host
  running an affected NIC gets one ``/sg/apply`` of those NICs, one nft transaction;
* when a host (re)connects, also after its agent restarted: the host's whole table;
* when the SecurityGroup service is attached to or detached from an L3 network, or a running
  VM's NICs change (``NicHook``).

``Excluded`` lets a removal compute the state *without* what it removes before removing it: the
hosts are told first, and the database changes only when they all applied it."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, select

from nimbostack.core.errors import ApiError
from nimbostack.core.hosts import agent
from nimbostack.db import models as m
from nimbostack.db.engine import Tx
from nimbostack.network import providers

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

PROVIDER_TYPE = "SecurityGroup"
SERVICE = "SecurityGroup"
# VM states in which a VM's NICs are filtered on its host (as the Flat provider serves them)
ACTIVE = ("Starting", "Running", "Rebooting", "Pausing", "Paused", "Resuming", "Unknown", "Migrating")


@dataclass(frozen=True)
class Excluded:
    """What a change is about to remove: left out of the computed state."""

    groups: frozenset[str] = frozenset()
    rules: frozenset[str] = frozenset()
    refs: frozenset[tuple[str, str]] = frozenset()  # (nic uuid, group uuid)


NOTHING = Excluded()


@dataclass
class HostNics:
    host_uuid: str
    nics: dict[str, str] = field(default_factory=dict)  # nic uuid -> vm uuid


_HAS_REF = (
    select(m.VmNicSecurityGroupRef.uuid).where(m.VmNicSecurityGroupRef.vmInstanceUuid == bindparam("vm")).limit(1)
)


def _served_l3s() -> Any:
    return providers.l3s_served_by(PROVIDER_TYPE, SERVICE)


async def entries(s: Tx, nic_uuids: set[str], ex: Excluded = NOTHING) -> dict[str, dict[str, Any]]:
    """{nic: its /sg/apply entry} of the NICs among ``nic_uuids`` that are filtered."""
    if not nic_uuids:
        return {}
    rows = (
        await s.execute(
            select(m.VmNicSecurityGroupRef.vmNicUuid, m.VmNicSecurityGroupRef.securityGroupUuid, m.VmNic.vmInstanceUuid)
            .join(m.VmNic, m.VmNic.uuid == m.VmNicSecurityGroupRef.vmNicUuid)
            .join(m.SecurityGroup, m.SecurityGroup.uuid == m.VmNicSecurityGroupRef.securityGroupUuid)
            .join(
                m.SecurityGroupL3NetworkRef,
                (m.SecurityGroupL3NetworkRef.securityGroupUuid == m.VmNicSecurityGroupRef.securityGroupUuid)
                & (m.SecurityGroupL3NetworkRef.l3NetworkUuid == m.VmNic.l3NetworkUuid),
            )
            .where(
                m.VmNicSecurityGroupRef.vmNicUuid.in_(sorted(nic_uuids)),
                m.SecurityGroup.state == "Enabled",
                m.VmNic.l3NetworkUuid.in_(_served_l3s()),
            )
        )
    ).all()
    groups: dict[str, set[str]] = defaultdict(set)
    vm_of: dict[str, str] = {}
    for nic, group, vm in rows:
        if group in ex.groups or (nic, group) in ex.refs:
            continue
        groups[nic].add(group)
        vm_of[nic] = vm
    all_groups = set().union(*groups.values()) if groups else set()
    rules: dict[str, list[m.SecurityGroupRule]] = defaultdict(list)
    if all_groups:
        for r in (
            await s.execute(
                select(m.SecurityGroupRule)
                .where(
                    m.SecurityGroupRule.securityGroupUuid.in_(sorted(all_groups)),
                    m.SecurityGroupRule.state == "Enabled",
                )
                .order_by(m.SecurityGroupRule.createDate, m.SecurityGroupRule.uuid)
            )
        ).scalars():
            if r.uuid not in ex.rules:
                rules[r.securityGroupUuid].append(r)
    out: dict[str, dict[str, Any]] = {}
    for nic in sorted(groups):
        mine = [r for g in sorted(groups[nic]) for r in rules[g]]
        out[nic] = {
            "nicUuid": nic,
            "vmUuid": vm_of[nic],
            "ingress": [_rule(r) for r in mine if r.type == "Ingress"],
            "egress": [_rule(r) for r in mine if r.type == "Egress"],
        }
    return out


def _rule(r: m.SecurityGroupRule) -> dict[str, Any]:
    return {"protocol": r.protocol, "startPort": r.startPort, "endPort": r.endPort, "allowedCidr": r.allowedCidr}


async def hosts_of(s: Tx, nic_uuids: set[str]) -> dict[str, HostNics]:
    """The connected hosts running the NICs, with the NICs each runs."""
    if not nic_uuids:
        return {}
    rows = (
        await s.execute(
            select(m.VmNic.uuid, m.VmNic.vmInstanceUuid, m.VmInstance.hostUuid)
            .join(m.VmInstance, m.VmInstance.uuid == m.VmNic.vmInstanceUuid)
            .join(m.Host, m.Host.uuid == m.VmInstance.hostUuid)
            .where(m.VmNic.uuid.in_(sorted(nic_uuids)), m.VmInstance.state.in_(ACTIVE), m.Host.status == "Connected")
        )
    ).all()
    out: dict[str, HostNics] = {}
    for nic, vm, host in rows:
        out.setdefault(host, HostNics(host)).nics[nic] = vm
    return out


async def push_nics(p: Platform, nic_uuids: set[str], ex: Excluded = NOTHING) -> list[str]:
    """Tell every connected host running one of the NICs what it now enforces for them (one
    ``/sg/apply`` each, in parallel); the hosts that applied it. The first failure is raised
    after all have answered, so that the caller can put those hosts back."""
    async with p.db.tx() as s:
        hosts = await hosts_of(s, nic_uuids)
        wanted = await entries(s, set().union(*(set(h.nics) for h in hosts.values())) if hosts else set(), ex)
    done: list[str] = []
    errors: list[ApiError] = []

    async def one(h: HostNics) -> None:
        body = {
            "nics": [wanted[n] for n in sorted(h.nics) if n in wanted],
            "remove": [n for n in sorted(h.nics) if n not in wanted],
        }
        try:
            async with p.queues.serial(f"sg:{h.host_uuid}"):
                await agent(p, h.host_uuid, "/sg/apply", body)
            done.append(h.host_uuid)
        except ApiError as err:
            errors.append(err)

    await asyncio.gather(*(one(h) for h in hosts.values()))
    if errors:
        raise errors[0]
    return done


async def members(s: Tx, group_uuids: set[str], l3_uuid: str | None = None) -> set[str]:
    """The NICs in the groups (on ``l3_uuid`` only, when given)."""
    stmt = select(m.VmNicSecurityGroupRef.vmNicUuid).where(m.VmNicSecurityGroupRef.securityGroupUuid.in_(group_uuids))
    if l3_uuid:
        stmt = stmt.join(m.VmNic, m.VmNic.uuid == m.VmNicSecurityGroupRef.vmNicUuid).where(
            m.VmNic.l3NetworkUuid == l3_uuid
        )
    return set((await s.execute(stmt)).scalars())


async def push_vm(
    p: Platform, vm_uuid: str, host_uuid: str, url: str | None = None, releasing: bool = False, always: bool = False
) -> None:
    """The VM's chains on its host: all of its NICs' (none when ``releasing``). Unless ``always``,
    a VM in no group costs one indexed read and no agent call."""
    async with p.db.tx() as s:
        if not always and (await s.execute(_HAS_REF, {"vm": vm_uuid})).first() is None:
            return  # in no group: no chain to make, none was made
        nics = set((await s.execute(select(m.VmNic.uuid).where(m.VmNic.vmInstanceUuid == vm_uuid))).scalars())
        wanted = {} if releasing else await entries(s, nics)
    body = {
        "vmUuids": [vm_uuid],
        "nics": [wanted[n] for n in sorted(wanted)],
        "remove": sorted(nics - set(wanted)),
    }
    async with p.queues.serial(f"sg:{host_uuid}"):
        await agent(p, host_uuid, "/sg/apply", body, url)


# --- hooks -------------------------------------------------------------------------------------


async def before_start(p: Platform, vm_uuid: str, host_uuid: str, url: str | None) -> None:
    """The chains exist before the domain starts, so the guest's NIC is never up unfiltered."""
    await push_vm(p, vm_uuid, host_uuid, url)


async def release(p: Platform, vm_uuid: str, host_uuid: str) -> None:
    await push_vm(p, vm_uuid, host_uuid, releasing=True)


async def on_nic_change(p: Platform, vm_uuid: str, host_uuid: str, l3_uuid: str) -> None:
    """A running VM's NICs changed: a NIC removed takes its chains along (its refs went with it,
    so the VM may be in no group any more). Only L3 networks with the SecurityGroup service can
    have had a filtered NIC."""
    async with p.db.tx() as s:
        if await providers.attached_type(s, l3_uuid, SERVICE) != PROVIDER_TYPE:
            return
    await push_vm(p, vm_uuid, host_uuid, always=True)


async def on_host_connect(p: Platform, host_uuid: str) -> None:
    """The host's whole table, rebuilt: what changed while it was away, or after its agent (or
    the machine) restarted, is right again."""
    async with p.db.tx() as s:
        nics = set(
            (
                await s.execute(
                    select(m.VmNic.uuid)
                    .join(m.VmInstance, m.VmInstance.uuid == m.VmNic.vmInstanceUuid)
                    .join(m.VmNicSecurityGroupRef, m.VmNicSecurityGroupRef.vmNicUuid == m.VmNic.uuid)
                    .where(m.VmInstance.hostUuid == host_uuid, m.VmInstance.state.in_(ACTIVE))
                    .distinct()
                )
            ).scalars()
        )
        wanted = await entries(s, nics)
    try:
        async with p.queues.serial(f"sg:{host_uuid}"):
            await agent(p, host_uuid, "/sg/apply", {"full": True, "nics": [wanted[n] for n in sorted(wanted)]})
    except ApiError as err:
        log.warning("host %s connected, but its security group rules were not applied: %s", host_uuid, err)


async def on_l3_services_changed(p: Platform, l3_uuid: str, _carrying: frozenset[str] = frozenset()) -> None:
    """The SecurityGroup service was attached to or detached from the L3 network: its member
    NICs are filtered, or no longer (on their VMs' hosts, which push_nics finds from the NICs)."""
    async with p.db.tx() as s:
        nics = set(
            (
                await s.execute(
                    select(m.VmNicSecurityGroupRef.vmNicUuid)
                    .join(m.VmNic, m.VmNic.uuid == m.VmNicSecurityGroupRef.vmNicUuid)
                    .where(m.VmNic.l3NetworkUuid == l3_uuid)
                )
            ).scalars()
        )
    try:
        await push_nics(p, nics)
    except ApiError as err:
        log.warning("security groups of L3 network %s not applied everywhere: %s (ReconnectHost retries)", l3_uuid, err)
