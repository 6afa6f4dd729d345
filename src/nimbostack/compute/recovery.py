"""Start-up recovery: a management node killed mid-flow leaves resources in transitional states.
Nothing else holds state, so the database plus the agents tell us how to settle each one."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import select, update

from nimbostack.compute import host as hostmod
from nimbostack.compute.allocator import release_all
from nimbostack.compute.vmsync import TRANSITIONAL
from nimbostack.core.envelope import reply_for_api
from nimbostack.core.errors import ApiError
from nimbostack.core.resources import disown
from nimbostack.db import models as m

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)


async def recover(p: Platform) -> None:
    await p.jobs.fail_orphans(reply_for_api)
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
        first_starts = [v.uuid for v in stuck if v.state == "Starting" and v.lastHostUuid is None]
        # a volume migration cut short: the source copy is the volume until the last step says otherwise
        await s.execute(update(m.Volume).where(m.Volume.status == "Migrating").values(status="Ready"))
        for vm in [v for v in stuck if v.state != "Created"]:
            # Unknown until the host says; the reconcile below sets Running/Stopped from the hypervisor
            vm.state = "Stopped" if vm.state == "Destroying" and not vm.hostUuid else "Unknown"
        hosts = (await s.execute(select(m.Host.uuid))).scalars().all()
    for host_uuid in hosts:
        try:
            await hostmod.connect(p, host_uuid)
        except ApiError as err:
            log.warning("recovery: host %s did not answer (%s); it is Disconnected", host_uuid, err.details)
    await _finish_first_starts(p, first_starts)
    await _settle_unknown(p)
    await hostmod.recompute_capacity(p)
    await _drop_orphan_ips(p)


async def _finish_first_starts(p: Platform, vm_uuids: list[str]) -> None:
    """Creations cut short while starting: a VM its hypervisor runs is created after all; one it
    does not run is rolled back like a creation that failed (its API already answered an error).
    A VM whose host did not answer stays Unknown until the host is back."""
    if not vm_uuids:
        return
    async with p.db.tx() as s:
        vms = (await s.execute(select(m.VmInstance).where(m.VmInstance.uuid.in_(vm_uuids)))).scalars().all()
        for vm in vms:
            if vm.state == "Running":
                vm.lastHostUuid = vm.hostUuid
            elif vm.state == "Stopped":
                log.warning("recovery: VM %s never ran; rolling back its unfinished creation", vm.uuid)
                await release_all(s, vm.uuid, release_volumes=True)
                await s.delete(vm)
                await disown(s, [vm.uuid])


async def _settle_unknown(p: Platform) -> None:
    """VMs whose host did not answer, or that the hypervisor does not run, are Stopped."""
    async with p.db.tx() as s:
        for vm in (await s.execute(select(m.VmInstance).where(m.VmInstance.state == "Unknown"))).scalars():
            host = await s.get(m.Host, vm.hostUuid) if vm.hostUuid else None
            if host is None or host.status == "Connected":
                vm.state = "Stopped"
                vm.lastHostUuid, vm.hostUuid = vm.hostUuid or vm.lastHostUuid, None


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
