"""The Flat network service provider on the management node: distributed DHCP and userdata.

Every host runs, per Flat L3 network, its own DHCP server and metadata service (agent side:
``nimbostack.plugins.flat.host``) that know only the VMs running on that host. This module decides what
each host serves and pushes it as the full desired state of one L3 network on one host
(``/flat/apply``, idempotent), whenever that changes:

* before a VM starts on a host and after it stops or is destroyed (a VM start extension, with its release);
* when a VM's ``userdata::`` / ``sshkey::`` / ``hostname::`` tags change;
* when a running VM gains or loses a NIC (AttachL3NetworkToVm, DetachL3NetworkFromVm);
* when a host (re)connects: the upgrade walkthrough (1.0 §13) switches an
  L3 network from the VirtualRouter provider to Flat and reconnects the hosts;
* when Flat services are attached to or detached from an L3 network, or it is deleted
  (``/flat/release`` on every host).

Flat acts only on the services the L3 network takes from it (NetworkServiceL3NetworkRef): an L3
may take DHCP and Userdata from Flat and SNAT/EIP from the VirtualRouter provider."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import yaml
from sqlalchemy import Row, bindparam, delete, select
from sqlalchemy.orm import aliased

from nimbostack.core.errors import ApiError
from nimbostack.core.hooks import StartCommand
from nimbostack.core.hosts import agent, agent_url_of, connected_among
from nimbostack.core.tags import tag_value
from nimbostack.db import models as m
from nimbostack.db.engine import Tx, columns, in_values
from nimbostack.network import ipam, l2l3
from nimbostack.wire import validate

if TYPE_CHECKING:
    from nimbostack.core.context import ApiContext
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

PROVIDER_TYPE = "Flat"
SERVICES = ("DHCP", "Userdata")
DHCP_USED_FOR = "DHCP"
# the agent's answer to entries of one VM it has no state of the L3 network to add to
FULL_STATE_NEEDED = "FLAT_FULL_STATE_NEEDED"
# VM states in which a VM's NICs are served on its host (Stopping/Destroying VMs are on their way out)
ACTIVE = ("Starting", "Running", "Rebooting", "Pausing", "Paused", "Resuming", "Unknown", "Migrating")
# Hook functions may want extra per-VM fields (the EIP module adds publicIp); (s, vm_uuids) -> {vm: {..}}
ENTRY_EXTRAS: list[Any] = []


async def flat_services(s: Tx, l3_uuid: str) -> set[str]:
    """The services the L3 network takes from the Flat provider."""
    rows = await s.execute(
        select(m.NetworkServiceL3NetworkRef.networkServiceType)
        .join(
            m.NetworkServiceProvider,
            m.NetworkServiceProvider.uuid == m.NetworkServiceL3NetworkRef.networkServiceProviderUuid,
        )
        .where(m.NetworkServiceL3NetworkRef.l3NetworkUuid == l3_uuid, m.NetworkServiceProvider.type == PROVIDER_TYPE)
    )
    return set(rows.scalars())


async def _flat_l3s(s: Tx, l3_uuids: set[str]) -> dict[str, set[str]]:
    """{l3: Flat's DHCP/Userdata services} for the L3 networks among ``l3_uuids`` that have any."""
    if not l3_uuids:
        return {}
    rows = await s.execute(
        select(m.NetworkServiceL3NetworkRef.l3NetworkUuid, m.NetworkServiceL3NetworkRef.networkServiceType)
        .join(
            m.NetworkServiceProvider,
            m.NetworkServiceProvider.uuid == m.NetworkServiceL3NetworkRef.networkServiceProviderUuid,
        )
        .where(
            m.NetworkServiceL3NetworkRef.l3NetworkUuid.in_(l3_uuids),
            m.NetworkServiceProvider.type == PROVIDER_TYPE,
            m.NetworkServiceL3NetworkRef.networkServiceType.in_(SERVICES),
        )
    )
    out: dict[str, set[str]] = defaultdict(set)
    for l3, svc in rows:
        out[l3].add(svc)
    return dict(out)


# --- the DHCP server's IP ----------------------------------------------------------------------


async def dhcp_ip(p: Platform, l3_uuid: str) -> Row[Any] | None:
    """The L3 network's DHCP server IP: taken once from its IP ranges, kept as a UsedIp row."""
    # every VM start asks; only taking the IP needs the queue (through it, all starts on the L3
    # went one at a time)
    async with p.db.tx() as s:
        rows = await _dhcp_rows(s, l3_uuid)
    if rows:
        return rows[0]
    async with p.queues.serial(f"flat-dhcp-ip:{l3_uuid}"):
        async with p.db.tx() as s:
            rows = await _dhcp_rows(s, l3_uuid)
            if rows:
                return rows[0]
            if not (await s.execute(select(m.IpRange.uuid).where(m.IpRange.l3NetworkUuid == l3_uuid))).first():
                return None
            await ipam.allocate(s, l3_uuid, used_for=DHCP_USED_FOR)
        async with p.db.tx() as s:
            # another management node may have raced us: keep the oldest, give back the rest
            rows = await _dhcp_rows(s, l3_uuid)
            if len(rows) > 1:
                await ipam.release(s, [r.uuid for r in rows[1:]])
            return rows[0] if rows else None


# built once, as the statements of every VM start (db/engine.py, "Statements built once")
_DHCP_ROWS = (
    select(*columns(m.UsedIp))
    .where(m.UsedIp.l3NetworkUuid == bindparam("l3"), m.UsedIp.usedFor == DHCP_USED_FOR)
    .order_by(m.UsedIp.createDate, m.UsedIp.uuid)
)
# The L3 network with what every VM start reads of it besides: its L2 (its columns named as its
# own, which l2l3.bridge_of reads), the L2's bridge tag and the DHCP server IP (the oldest, as
# dhcp_ip keeps), in one statement rather than four.
_DHCP = aliased(m.UsedIp, name="dhcp")
_OLDEST_DHCP = (
    select(m.UsedIp.uuid)
    .where(m.UsedIp.l3NetworkUuid == m.L3Network.uuid, m.UsedIp.usedFor == DHCP_USED_FOR)
    .order_by(m.UsedIp.createDate, m.UsedIp.uuid)
    .limit(1)
    .correlate(m.L3Network)
    .scalar_subquery()
)
_L3_AND_L2 = (
    select(
        m.L3Network.uuid,
        m.L3Network.dnsDomain,
        m.L2Network.uuid.label("l2Uuid"),
        m.L2Network.type.label("l2Type"),
        m.L2Network.physicalInterface,
        m.L2Network.vlan,
        l2l3.BRIDGE_TAG,
        _DHCP.ip.label("dhcpIp"),
        _DHCP.netmask.label("dhcpNetmask"),
        _DHCP.gateway.label("dhcpGateway"),
    )
    .outerjoin(m.L2Network, m.L2Network.uuid == m.L3Network.l2NetworkUuid)
    .outerjoin(_DHCP, _DHCP.uuid == _OLDEST_DHCP)
    .where(m.L3Network.uuid == bindparam("l3"))
)
_L3_DNS = select(m.L3NetworkDns.dns).where(m.L3NetworkDns.l3NetworkUuid == bindparam("l3")).order_by(m.L3NetworkDns.id)
# a row per NIC: its VM's columns under their own names (hostname_of reads uuid and name), and the
# NIC's uuid, mac and ip
_HOST_NICS = (
    select(
        m.VmNic.uuid.label("nicUuid"),
        m.VmNic.mac,
        m.VmNic.ip,
        m.VmInstance.uuid,
        m.VmInstance.name,
        m.VmInstance.defaultL3NetworkUuid,
        m.VmInstance.zoneUuid,
    )
    .join(m.VmInstance, m.VmInstance.uuid == m.VmNic.vmInstanceUuid)
    .where(
        m.VmNic.l3NetworkUuid == bindparam("l3"),
        m.VmInstance.hostUuid == bindparam("host"),
        in_values(m.VmInstance.state, ACTIVE),
    )
    .order_by(m.VmNic.ip)
)
_HOST_NICS_OF_VM = _HOST_NICS.where(m.VmNic.vmInstanceUuid == bindparam("vm"))
_TAGS = select(m.SystemTag.resourceUuid, m.SystemTag.tag).order_by(m.SystemTag.createDate, m.SystemTag.uuid)
_TAGS_OF = _TAGS.where(m.SystemTag.resourceUuid.in_(bindparam("uuids", expanding=True)))
# one VM's (every VM start asks): an IN list of one is rendered anew at every execution (in_values)
_TAGS_OF_ONE = _TAGS.where(m.SystemTag.resourceUuid == bindparam("uuid"))


async def _dhcp_rows(s: Tx, l3_uuid: str) -> list[Row[Any]]:
    return list((await s.execute(_DHCP_ROWS, {"l3": l3_uuid})).all())


async def release_dhcp_ip(p: Platform, l3_uuid: str) -> None:
    async with p.db.tx() as s:
        await s.execute(delete(m.UsedIp).where(m.UsedIp.l3NetworkUuid == l3_uuid, m.UsedIp.usedFor == DHCP_USED_FOR))


# --- what one host serves on one L3 network ----------------------------------------------------


def hostname_of(vm: m.VmInstance | Row[Any], tags: list[str]) -> str:
    wanted = tag_value(tags, "hostname::")
    if wanted:
        try:
            return validate.hostname(wanted)
        except ValueError:
            log.warning("VM %s: hostname tag %r is not a DNS name; using its name", vm.uuid, wanted[:80])
    return validate.safe_hostname(vm.name or "", f"vm-{vm.uuid[:8]}")


def userdata_of(tags: list[str]) -> str | None:
    raw = tag_value(tags, "userdata::")
    # the tag stores newlines as the two characters \ and n (the spec's minified YAML)
    return with_cloud_config_header(raw.replace("\\n", "\n")) if raw else None


# what cloud-init recognises at the start of userdata (its "part handlers"), MIME included
_HEADERS = ("#", "content-type:", "mime-version:")


@functools.lru_cache(maxsize=4096)  # every push of an L3 network's state asks for each VM's
def with_cloud_config_header(text: str) -> str:
    """The release notes' userdata examples have no ``#cloud-config`` line, and stock cloud-init
    runs nothing without one ("Unhandled non-multipart userdata"). Userdata with no header it
    knows that parses as a YAML mapping gets the line; anything else is served byte for byte."""
    if text.lstrip().lower().startswith(_HEADERS):
        return text
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return "#cloud-config\n" + text if isinstance(doc, dict) else text


def ssh_keys_of(vm_uuid: str, tags: list[str]) -> list[str]:
    keys = []
    for t in tags:
        if t.startswith("sshkey::"):
            try:
                keys.append(validate.ssh_key(t[len("sshkey::") :]))
            except ValueError:
                log.warning("VM %s: sshkey tag is not an OpenSSH public key line; not served", vm_uuid)
    return keys


_last_seq = 0


def next_seq() -> int:
    """Increasing over the node's life and across its restarts (nanoseconds of the clock)."""
    global _last_seq
    _last_seq = max(_last_seq + 1, time.time_ns())
    return _last_seq


async def desired_state(
    p: Platform,
    host_uuid: str,
    l3_uuid: str,
    services: set[str],
    exclude: str | None = None,
    only: str | None = None,
    extras: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """The body of ``/flat/apply`` for one L3 network on one host (None: nothing can be served);
    with ``only``, of ``/flat/apply-vm``: the entries of that one VM. ``extras``: the fields
    ENTRY_EXTRAS would add, when the caller knows them already.

    ``seq`` is taken before the reads: the host keeps entries of a later seq when this state
    arrives after them (they were read after it, and may be missing from it)."""
    seq = next_seq()
    async with p.db.tx() as s:
        l3 = (await s.execute(_L3_AND_L2, {"l3": l3_uuid})).first()
        if l3 is not None and l3.dhcpIp is not None:
            dns = list((await s.execute(_L3_DNS, {"l3": l3_uuid})).scalars())
            rows, tags, extras = await _served(s, l3_uuid, host_uuid, exclude, only, extras)
    if l3 is None:
        return None
    if l3.dhcpIp is None:
        # the L3 network's first VM: it has no DHCP server IP yet. Take one, outside a transaction
        # (dhcp_ip waits for its turn in a queue), and read again.
        if await dhcp_ip(p, l3_uuid) is None:
            log.warning("L3 network %s has no IP range: no DHCP server IP, Flat services not applied", l3_uuid)
            return None
        return await desired_state(p, host_uuid, l3_uuid, services, exclude, only, extras)
    vms = []
    for vm in rows:
        t = tags.get(vm.uuid, [])
        entry: dict[str, Any] = {
            "vmUuid": vm.uuid,
            "nicUuid": vm.nicUuid,
            "mac": vm.mac,
            "ip": vm.ip,
            "hostname": hostname_of(vm, t),
            "isDefault": vm.defaultL3NetworkUuid in (None, l3_uuid),
            "userdata": userdata_of(t) if "Userdata" in services else None,
            "sshKeys": ssh_keys_of(vm.uuid, t) if "Userdata" in services else [],
            "zoneUuid": vm.zoneUuid,
        }
        entry.update(extras.get(vm.uuid, {}))
        vms.append(entry)
    domain = l3.dnsDomain
    try:
        domain = validate.domain(domain)
    except ValueError:
        log.warning("L3 network %s: dnsDomain %r is not a DNS name; not offered by DHCP", l3_uuid, domain)
        domain = None
    return {
        "hostUuid": host_uuid,
        "seq": seq,
        "l3": {
            "uuid": l3.uuid,
            "bridge": l2l3.bridge_of(l3, l3.bridgeTag),
            "physicalInterface": l3.physicalInterface,
            "vlan": l3.vlan if l3.l2Type == "L2VlanNetwork" else None,
            "dhcpServerIp": l3.dhcpIp,
            "netmask": l3.dhcpNetmask,
            "gateway": l3.dhcpGateway,
            "dns": dns,
            "dnsDomain": domain,
            "services": sorted(services),
        },
        "vms": vms,
    }


async def _served(
    s: Tx,
    l3_uuid: str,
    host_uuid: str,
    exclude: str | None,
    only: str | None,
    known: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[Row[Any]], dict[str, list[str]], dict[str, dict[str, Any]]]:
    """The VMs the host serves on the L3 network (``only``: that one), a row per NIC, with their
    system tags and the fields ENTRY_EXTRAS add."""
    if only:
        found = (await s.execute(_HOST_NICS_OF_VM, {"l3": l3_uuid, "host": host_uuid, "vm": only})).all()
    else:
        found = (await s.execute(_HOST_NICS, {"l3": l3_uuid, "host": host_uuid})).all()
    rows = [vm for vm in found if vm.uuid != exclude and vm.ip and vm.mac]
    vm_uuids = sorted({vm.uuid for vm in rows})
    tags: dict[str, list[str]] = defaultdict(list)
    if vm_uuids:
        if len(vm_uuids) == 1:
            tag_rows = await s.execute(_TAGS_OF_ONE, {"uuid": vm_uuids[0]})
        else:
            tag_rows = await s.execute(_TAGS_OF, {"uuids": vm_uuids})
        for ruuid, tag in tag_rows:
            tags[ruuid].append(tag)
    extras: dict[str, dict[str, Any]] = defaultdict(dict)
    if known is not None:
        extras.update(known)
        return rows, tags, extras
    for extra in ENTRY_EXTRAS:
        for vm_uuid, fields in (await extra(s, l3_uuid, vm_uuids)).items():
            extras[vm_uuid].update(fields)
    return rows, tags, extras


async def push(p: Platform, host_uuid: str, l3_uuid: str, exclude: str | None = None) -> dict[str, Any] | None:
    """Compute and send the desired state of one L3 network on one host, one push at a time per
    (host, L3) so a slower, older push never overwrites a newer one."""
    async with p.queues.serial(f"flat:{host_uuid}:{l3_uuid}"):
        async with p.db.tx() as s:
            services = await flat_services(s, l3_uuid) & set(SERVICES)
        return await _push_full(p, host_uuid, l3_uuid, services, exclude)


async def _push_full(
    p: Platform, host_uuid: str, l3_uuid: str, services: set[str], exclude: str | None = None
) -> dict[str, Any] | None:
    if not services:
        return None
    body = await desired_state(p, host_uuid, l3_uuid, services, exclude)
    if body is None:
        return None
    if not body["vms"]:
        # its last VM left: the host no longer carries the L3, and stops serving it, so that
        # what later changes on the L3 (services detached, deleted) concerns its VMs' hosts only
        await _release(p, host_uuid, l3_uuid, seq=body["seq"])
        return None
    await agent(p, host_uuid, "/flat/apply", {k: v for k, v in body.items() if k != "hostUuid"})
    return body


async def vm_entries(
    p: Platform,
    host_uuid: str,
    l3_uuid: str,
    services: set[str],
    vm_uuid: str,
    extras: dict[str, dict[str, Any]] | None = None,
) -> StartCommand | None:
    """What serves one starting VM on its host: its own entries (``/flat/apply-vm``), for the VM's
    ``/vm/start`` to carry, not the state of every VM of the L3 network on the host, whose size
    (and cost, on both sides) grew with the host's VMs. A host without that state to add to (its
    agent restarted) refuses it, and gets the full state instead.

    Not in the (host, L3) queue that orders full pushes: the body's ``seq`` orders them on the
    host (a full state computed before these entries keeps them)."""
    services &= set(SERVICES)
    if not services:
        return None
    body = await desired_state(p, host_uuid, l3_uuid, services, only=vm_uuid, extras=extras)
    if body is None:
        return None

    async def full_state() -> None:
        log.info("host %s: Flat L3 %s gets its full state", host_uuid, l3_uuid)
        await push(p, host_uuid, l3_uuid)

    return StartCommand(
        "/flat/apply-vm",
        {"vmUuid": vm_uuid, "seq": body["seq"], "l3": body["l3"], "vms": body["vms"]},
        refused=FULL_STATE_NEEDED,
        recover=full_state,
    )


async def release_on(p: Platform, l3_uuid: str, hosts: frozenset[str]) -> None:
    """``/flat/release`` of one L3 network on those of ``hosts`` that are connected (a no-op
    where it never was). Only the hosts that carry the L3 (providers.hosts_carrying): a host
    serves an L3 while it runs a VM with a NIC on it (_push_full releases it after the last), so
    an L3's change costs what its VMs' hosts cost, not what the platform's hosts do."""
    rows = await connected_among(p, hosts) if hosts else []
    sem = asyncio.Semaphore(32)

    async def one(host_uuid: str, url: str) -> None:
        async with sem, p.queues.serial(f"flat:{host_uuid}:{l3_uuid}"):
            try:
                await _release(p, host_uuid, l3_uuid, url)
            except ApiError as err:
                log.warning("could not release Flat services of L3 %s on host %s: %s", l3_uuid, host_uuid, err)

    await asyncio.gather(*(one(h, u) for h, u in rows))


async def _release(
    p: Platform, host_uuid: str, l3_uuid: str, url: str | None = None, seq: int | None = None
) -> None:
    """``seq``: of the read that found the host without VMs on the L3 (a VM's entries sent since
    with its start keep it served); without one, the L3 goes whatever the host serves."""
    url = url or await agent_url_of(p, host_uuid)
    body: dict[str, Any] = {"hostUuid": host_uuid, "l3Uuid": l3_uuid}
    if seq is not None:
        body["seq"] = seq
    await p.agents.call(url, "/flat/release", body, timeout=30)


VM_FLAT_L3S = (
    select(m.NetworkServiceL3NetworkRef.l3NetworkUuid, m.NetworkServiceL3NetworkRef.networkServiceType)
    .join(
        m.NetworkServiceProvider,
        m.NetworkServiceProvider.uuid == m.NetworkServiceL3NetworkRef.networkServiceProviderUuid,
    )
    .where(
        m.NetworkServiceL3NetworkRef.l3NetworkUuid.in_(
            select(m.VmNic.l3NetworkUuid).where(m.VmNic.vmInstanceUuid == bindparam("vm"))
        ),
        m.NetworkServiceProvider.type == PROVIDER_TYPE,
        in_values(m.NetworkServiceL3NetworkRef.networkServiceType, SERVICES),
    )
)


async def _vm_flat_l3s(p: Platform, vm_uuid: str) -> dict[str, set[str]]:
    """_flat_l3s of the VM's NICs' L3 networks, in one statement instead of two (every VM start and
    stop asks)."""
    async with p.db.tx() as s:
        rows = await s.execute(VM_FLAT_L3S, {"vm": vm_uuid})
        out: dict[str, set[str]] = defaultdict(set)
        for l3, svc in rows:
            out[l3].add(svc)
        return dict(out)


# --- hooks -------------------------------------------------------------------------------------


async def on_vm_stop(p: Platform, vm_uuid: str, host_uuid: str | None) -> None:
    if not host_uuid:
        return
    for l3_uuid in sorted(await _vm_flat_l3s(p, vm_uuid)):
        try:
            await push(p, host_uuid, l3_uuid, exclude=vm_uuid)
        except ApiError as err:
            log.warning("VM %s stopped but its Flat entries on host %s stay: %s", vm_uuid, host_uuid, err)


async def on_tag_change(ctx: ApiContext, resource_type: str, resource_uuid: str) -> None:
    if resource_type != "VmInstanceVO":
        return
    await refresh_vm(ctx.p, resource_uuid)


async def on_nic_change(p: Platform, vm_uuid: str, host_uuid: str, l3_uuid: str) -> None:
    """The VM's NICs on the L3 network changed: the host serves that L3 as the database now
    says (the new NIC's lease, or none for the removed one). The L3 is named, not found from the
    VM's NICs: a detached NIC is no longer among them. A failure is raised (hooks.nic_changed)."""
    await push(p, host_uuid, l3_uuid)


async def refresh_vm(p: Platform, vm_uuid: str) -> None:
    """Re-push the Flat L3 networks of a running VM (its tags or addresses changed)."""
    async with p.db.tx() as s:
        vm = await s.get(m.VmInstance, vm_uuid)
        if vm is None or not vm.hostUuid or vm.state not in ACTIVE:
            return
        host_uuid = vm.hostUuid
    for l3_uuid in sorted(await _vm_flat_l3s(p, vm_uuid)):
        try:
            await push(p, host_uuid, l3_uuid)
        except ApiError as err:
            log.warning("could not refresh Flat services of VM %s on host %s: %s", vm_uuid, host_uuid, err)


async def on_host_connect(p: Platform, host_uuid: str) -> None:
    """Re-push every Flat L3 network with VMs on the host; drop what the host no longer needs."""
    async with p.db.tx() as s:
        l3s = set(
            (
                await s.execute(
                    select(m.VmNic.l3NetworkUuid)
                    .join(m.VmInstance, m.VmInstance.uuid == m.VmNic.vmInstanceUuid)
                    .where(m.VmInstance.hostUuid == host_uuid, m.VmInstance.state.in_(ACTIVE))
                    .distinct()
                )
            ).scalars()
        )
        flat = await _flat_l3s(s, l3s)
    keep = []
    for l3_uuid in sorted(flat):
        try:
            if await push(p, host_uuid, l3_uuid) is not None:
                keep.append(l3_uuid)
        except ApiError as err:
            log.warning("host %s connected, but Flat services of L3 %s failed: %s", host_uuid, l3_uuid, err)
    try:
        await agent(p, host_uuid, "/flat/sync", {"l3Uuids": keep})
    except ApiError as err:
        log.warning("host %s: could not drop stale Flat L3 networks: %s", host_uuid, err)


async def on_l3_delete(p: Platform, l3_uuid: str, hosts: frozenset[str]) -> None:
    await release_on(p, l3_uuid, hosts)
    await release_dhcp_ip(p, l3_uuid)


async def on_services_changed(p: Platform, l3_uuid: str, hosts: frozenset[str]) -> None:
    """Flat services attached (serve the L3's running VMs now, on their hosts) or detached (torn
    down on the hosts that carry the L3)."""
    async with p.db.tx() as s:
        services = await flat_services(s, l3_uuid) & set(SERVICES)
    if not services:
        await release_on(p, l3_uuid, hosts)
        await release_dhcp_ip(p, l3_uuid)
        return
    for host_uuid in sorted(hosts):
        try:
            await push(p, host_uuid, l3_uuid)
        except ApiError as err:
            log.warning(
                "Flat services of L3 %s not applied on host %s: %s (ReconnectHost retries)", l3_uuid, host_uuid, err
            )
