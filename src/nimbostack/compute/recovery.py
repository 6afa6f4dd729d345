"""Start-up recovery: a management node killed mid-flow leaves resources in transitional states.
Nothing else holds state, so the database plus the agents tell us how to settle each one.

Two parts, so that a node with many hosts serves again at once: ``recover`` settles what the
database alone can tell before the node serves (unanswered jobs, unfinished creations, orphan
IPs) and marks every host Connecting; the ``Reconnect`` it returns then connects the hosts in the
background, a bounded number at once, and settles each host's VMs as its agent answers. Until
then a host reads Connecting, allocation passes it over, and a command for it fails with
HOST.1002 (core/hosts.py), as ZStack answers for a host that is not Connected."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import or_, select, update

from nimbostack.compute import host as hostmod
from nimbostack.compute.allocator import recompute_capacity, release_all
from nimbostack.compute.vmsync import TRANSITIONAL
from nimbostack.core import gc, hooks, spec
from nimbostack.core.envelope import reply_for_api, wrap
from nimbostack.core.errors import ApiError
from nimbostack.core.resources import disown, inv
from nimbostack.db import models as m
from nimbostack.storage import primary

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

# hosts connected at once after a restart: enough to keep the agents' round trips overlapped,
# few enough that the API's own requests still find the event loop and the database free
RECONNECTS_AT_ONCE = 32


@dataclass
class Reconnect:
    """The hosts to connect after the restart, and the creations each one's answer settles."""

    hosts: list[str]
    first_starts: dict[str, list[str]] = field(default_factory=dict)  # host uuid -> VM uuids
    unknown: set[str] = field(default_factory=set)  # hosts with VMs in state Unknown
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, p: Platform) -> None:
        pending = iter(self.hosts)

        async def worker() -> None:
            for host_uuid in pending:
                await _reconnect(p, host_uuid, self.first_starts.get(host_uuid, []), host_uuid in self.unknown)

        try:
            await asyncio.gather(*(worker() for _ in range(min(RECONNECTS_AT_ONCE, len(self.hosts)))))
            log.info("recovery: %d hosts reconnected", len(self.hosts))
        finally:
            self.done.set()


async def recover(p: Platform) -> Reconnect:
    await p.jobs.fail_orphans(reply_for_api, await _finished_creations(p))
    async with p.db.tx() as s:
        stuck = (await s.execute(select(m.VmInstance).where(m.VmInstance.state.in_(TRANSITIONAL)))).scalars().all()
        # A VM still "Created" never finished its creation flow: undo it like its rollback would.
        for vm in [v for v in stuck if v.state == "Created"]:
            log.warning("recovery: rolling back the unfinished creation of VM %s", vm.uuid)
            await release_all(s, vm.uuid, release_volumes=True)
            await s.delete(vm)
            await disown(s, [vm.uuid])
        await s.flush()
        # A VM "Starting" that never ran (no lastHostUuid yet) was cut short in the last step of its
        # creation: once its host tells whether the domain runs, it is kept (Running) or undone.
        first_starts: dict[str, list[str]] = {}
        for v in stuck:
            if v.state == "Starting" and v.lastHostUuid is None and v.hostUuid:
                first_starts.setdefault(v.hostUuid, []).append(v.uuid)
        # a volume migration cut short: the source copy is the volume until the last step says otherwise
        await s.execute(update(m.Volume).where(m.Volume.status == "Migrating").values(status="Ready"))
        for vm in [v for v in stuck if v.state != "Created"]:
            # Unknown until the host says; the reconcile below sets Running/Stopped from the hypervisor
            vm.state = "Stopped" if vm.state == "Destroying" and not vm.hostUuid else "Unknown"
        # every host waits for its agent's answer, in this node's eyes as in the API's
        await s.execute(update(m.Host).values(status="Connecting"))
        hosts = list((await s.execute(select(m.Host.uuid).order_by(m.Host.uuid))).scalars().all())
    await _settle_unknown(p, None)
    await _drop_orphan_ips(p)
    async with p.db.tx() as s:
        unknown = set(
            (await s.execute(select(m.VmInstance.hostUuid).where(m.VmInstance.state == "Unknown").distinct()))
            .scalars()
            .all()
        )
    return Reconnect(hosts, first_starts, unknown)


async def _finished_creations(p: Platform) -> dict[str, str]:
    """CreateVmInstance jobs the dead node left unanswered although their VM was finished (it
    died between the VM's last step and the job's answer): they answer a success with the VM, as
    they would have. The others answer an error, and their VMs are rolled back."""
    created = {job: vm for job, api_name, vm in await p.jobs.orphans() if api_name == "CreateVmInstance" and vm}
    if not created:
        return {}
    reply = spec.reply_name(spec.messages()["CreateVmInstance"])
    out: dict[str, str] = {}
    async with p.db.tx() as s:
        vms = {
            vm.uuid: vm
            for vm in (
                await s.execute(
                    select(m.VmInstance).where(
                        m.VmInstance.uuid.in_(list(created.values())),
                        m.VmInstance.state == "Running",
                        m.VmInstance.lastHostUuid.is_not(None),  # the creation's last step set it
                    )
                )
            ).scalars()
        }
        for job, vm_uuid in created.items():
            if vm_uuid in vms:
                out[job] = wrap(reply, {"success": True, "inventory": await inv(s, "QueryObjectVmInstanceInventory",
                                                                                 vms[vm_uuid])})
    if out:
        log.warning("recovery: %d creations had finished but not answered; they answer their VM", len(out))
    return out


async def _reconnect(p: Platform, host_uuid: str, first_starts: list[str], unknown: bool) -> None:
    """Connect one host and settle its VMs; whatever fails leaves the host Disconnected (the
    ping loop reconnects it when it answers), never Connecting for good."""
    connected = False
    try:
        async with p.queues.serial(host_uuid):
            await hostmod.connect(p, host_uuid)
        connected = True
    except ApiError as err:
        log.warning("recovery: host %s did not answer (%s); it is Disconnected", host_uuid, err.details)
    except Exception:
        log.exception("recovery: connecting host %s failed; it is Disconnected", host_uuid)
        async with p.db.tx() as s:
            await s.execute(
                update(m.Host).where(m.Host.uuid == host_uuid, m.Host.status == "Connecting").values(
                    status="Disconnected"
                )
            )
    try:
        changed = await _finish_first_starts(p, first_starts)
        if unknown:  # the others have nothing to settle: spare 25,000 hosts a query each
            changed = await _settle_unknown(p, host_uuid) or changed
        # connect derived the capacity already; again where recovery moved VMs since, or where no
        # connect ran at all (what a crash left reserved is given back all the same)
        if changed or not connected:
            await recompute_capacity(p, host_uuid)
    except Exception:
        log.exception("recovery: settling the VMs of host %s failed", host_uuid)


async def _finish_first_starts(p: Platform, vm_uuids: list[str]) -> bool:
    """Creations cut short while starting are rolled back, whether or not the hypervisor runs the
    VM: their API job was answered an error (SYS.1010, ``recover``), so the answer must be the
    outcome — a client that retries must not end up with two VMs. The domain is destroyed, what
    the start set up on the host released, the volumes' files deleted (each by the GC if the host
    cannot be reached now). A VM whose host did not answer stays Unknown until the host is back.
    True if one was undone."""
    if not vm_uuids:
        return False
    async with p.db.tx() as s:
        rows = (
            await s.execute(
                select(m.VmInstance.uuid, m.VmInstance.state, m.VmInstance.hostUuid).where(
                    m.VmInstance.uuid.in_(vm_uuids), m.VmInstance.state.in_(("Running", "Stopped", "Paused"))
                )
            )
        ).all()
        files = {
            uuid: (
                await s.execute(
                    select(m.Volume.installPath, m.PrimaryStorage)
                    .join(m.PrimaryStorage, m.PrimaryStorage.uuid == m.Volume.primaryStorageUuid)
                    .where(m.Volume.vmInstanceUuid == uuid, m.Volume.installPath.is_not(None))
                )
            ).all()
            for uuid, _, _ in rows
        }
    for uuid, state, host_uuid in rows:
        log.warning("recovery: VM %s (%s) was still being created when the node died, and its API answered an "
                    "error; rolling the creation back", uuid, state)
        if host_uuid:
            if state != "Stopped":
                await gc.call_or_defer(p, gc.DESTROY_VM, host_uuid, "/vm/destroy", {"vmUuid": uuid}, uuid)
            await hooks.release(p, uuid, host_uuid)
            for path, ps in files[uuid]:
                await gc.call_or_defer(p, gc.DELETE_VOLUME_FILE, host_uuid, primary.command(ps, "delete"),
                                       {"path": ps.url, "installPath": path})
        async with p.db.tx() as s:
            await release_all(s, uuid, release_volumes=True)
            vm = await s.get(m.VmInstance, uuid)
            if vm is not None:
                await s.delete(vm)
            await disown(s, [uuid])
    return bool(rows)


async def _settle_unknown(p: Platform, host_uuid: str | None) -> bool:
    """VMs of the host (None: of no host, or of one deleted) that it did not answer for, or that
    the hypervisor does not run, are Stopped. True if one was."""
    settled = False
    async with p.db.tx() as s:
        if host_uuid:
            status = (await s.execute(select(m.Host.status).where(m.Host.uuid == host_uuid))).scalar()
            if status != "Connected":
                return False
        where = (
            m.VmInstance.hostUuid == host_uuid
            if host_uuid
            else or_(m.VmInstance.hostUuid.is_(None), m.VmInstance.hostUuid.not_in(select(m.Host.uuid)))
        )
        for vm in (await s.execute(select(m.VmInstance).where(m.VmInstance.state == "Unknown", where))).scalars():
            vm.state = "Stopped"
            vm.lastHostUuid, vm.hostUuid = vm.hostUuid or vm.lastHostUuid, None
            settled = True
    return settled


async def _drop_orphan_ips(p: Platform) -> None:
    async with p.db.tx() as s:
        referenced = select(m.VmNic.usedIpUuid).where(m.VmNic.usedIpUuid.is_not(None))
        orphans = (
            (await s.execute(select(m.UsedIp).where(m.UsedIp.uuid.not_in(referenced), m.UsedIp.usedFor == "VmNic")))
            .scalars()
            .all()
        )
        for ip in orphans:
            await s.delete(ip)
        if orphans:
            log.warning("recovery: released %d IPs no NIC held", len(orphans))
