"""VM state as the hypervisor sees it, pushed by agents (events) and pulled on (re)connect."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, select

from nimbostack.compute.allocator import recompute_capacity
from nimbostack.compute.vm_lifecycle import on_guest_reboot
from nimbostack.db import models as m

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

# States the management node is in the middle of changing: an event must not overrule the flow
# that owns the VM (it will set the final state itself).
TRANSITIONAL = (
    "Created",
    "Starting",
    "Stopping",
    "Rebooting",
    "Pausing",
    "Resuming",
    "Migrating",
    "Destroying",
    "Expunging",
)
STABLE_FROM_HYPERVISOR = ("Running", "Stopped", "Paused")
_STATE_AND_HOST = select(m.VmInstance.state, m.VmInstance.hostUuid, m.VmInstance.lastHostUuid).where(
    m.VmInstance.uuid == bindparam("vm")
)


async def on_event(platform: Platform, host_uuid: str, vm_uuid: str, state: str) -> None:
    """An agent reports that a VM changed state outside (or inside) our control."""
    if state == "Rebooted":
        asyncio.get_running_loop().create_task(on_guest_reboot(platform, vm_uuid))
        return
    if state not in STABLE_FROM_HYPERVISOR:
        return
    async with platform.db.tx() as s:
        # most events confirm what the node is doing or has just done (the start it asked for): two
        # columns tell, without loading the VM
        now = (await s.execute(_STATE_AND_HOST, {"vm": vm_uuid})).first()
        if now is None or now.state in TRANSITIONAL or now.state == "Destroyed":
            return
        if state == "Stopped" and now.hostUuid and now.hostUuid != host_uuid:
            return  # a copy left on another host (migrated, or started elsewhere since) stopped
        if now.hostUuid != host_uuid and not (now.hostUuid is None and now.lastHostUuid == host_uuid):
            # a host speaks for its own VMs only (the one it runs, or the stopped one it ran last):
            # a VM does not move because some agent says it runs there; a reconnect reconciles
            log.warning("ignored: host %s says VM %s is %s, but the VM is on host %s",
                        host_uuid, vm_uuid, state, now.hostUuid)
            return
        if now.state == state and (now.hostUuid == host_uuid or state == "Stopped"):
            # nothing changed (the event of a start or stop this node has just finished): a
            # Stopped VM stays on no host, whichever host's stop event comes late
            return
        vm = await s.get(m.VmInstance, vm_uuid)
        if vm is None:
            return
        log.info("VM %s is %s on host %s (was %s)", vm_uuid, state, host_uuid, vm.state)
        vm.state = state
        vm.hostUuid = host_uuid
        vm.lastHostUuid = host_uuid
    platform.events.publish("VmInstanceVO", vm_uuid, state=state, hostUuid=host_uuid)
    await recompute_capacity(platform, host_uuid)


async def apply_host_states(platform: Platform, host_uuid: str, states: dict[str, str]) -> None:
    """Reconcile after a (re)connect: the hypervisor's view wins for stable states."""
    async with platform.db.tx() as s:
        vms = (await s.execute(select(m.VmInstance).where(m.VmInstance.hostUuid == host_uuid))).scalars().all()
        for vm in vms:
            if vm.state in TRANSITIONAL or vm.state == "Destroyed":
                continue
            actual = states.get(vm.uuid, "Stopped")
            if actual in STABLE_FROM_HYPERVISOR and actual != vm.state:
                log.info("reconcile: VM %s is %s on host %s (database said %s)", vm.uuid, actual, host_uuid, vm.state)
                vm.state = actual
        # domains the hypervisor runs for VMs the database placed elsewhere or stopped
        known = {vm.uuid for vm in vms}
        for vm_uuid, actual in states.items():
            if vm_uuid in known or actual != "Running":
                continue
            vm = await s.get(m.VmInstance, vm_uuid)
            if vm is not None and vm.state in ("Stopped", "Unknown"):
                vm.state, vm.hostUuid, vm.lastHostUuid = "Running", host_uuid, host_uuid
