"""VM lifecycle operations: start, stop, reboot, update, console address, boot order and ISOs."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, delete, select, update

from nimbostack.compute.allocator import candidate_hosts, give_back_host, take_host, volume_placement
from nimbostack.compute.vm import need_state, set_state, vm_for, vm_inv
from nimbostack.compute.vmspec import ISO_INSTALL_TAG, build_spec, cached_image_path
from nimbostack.core import deadline, hooks
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import invalid, not_allowed
from nimbostack.core.hosts import agent
from nimbostack.core.resources import (
    load,
    update_fields,
)
from nimbostack.core.tags import system_tags
from nimbostack.db import models as m
from nimbostack.db.engine import Tx

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)


@api("StartVmInstance")
async def start_vm(ctx: ApiContext) -> dict[str, Any]:
    p = ctx.p
    vm = await vm_for(ctx)
    async with p.queues.serial(vm.uuid):
        vm = await vm_for(ctx, vm.uuid)
        if vm.state == "Running":
            return await vm_inv(ctx, vm.uuid)
        need_state(vm, "Stopped")
        cpu = vm.cpuNum * vm.cpuSpeed
        async with p.db.tx() as s:
            hosts = await start_candidates(s, vm, ctx.str("hostUuid"), ctx.str("clusterUuid"))
            chosen = await take_host(s, hosts, cpu, vm.memorySize)
            await s.execute(
                update(m.VmInstance)
                .where(m.VmInstance.uuid == vm.uuid)
                .values(state="Starting", hostUuid=chosen.uuid, clusterUuid=chosen.clusterUuid)
            )
        try:
            carried = await hooks.before_start(p, vm.uuid, chosen.uuid, chosen.agentUrl, defer=True)
            await hooks.start_vm(p, chosen.uuid, asdict(await build_spec(p, vm.uuid)), carried, chosen.agentUrl)
        except BaseException:
            async with p.db.tx() as s:
                await give_back_host(s, chosen.uuid, cpu, vm.memorySize)
                await s.execute(
                    update(m.VmInstance).where(m.VmInstance.uuid == vm.uuid).values(state="Stopped", hostUuid=None)
                )
            # Stopped first: a provider's release computes the host's state without this VM
            with deadline.grace():
                await hooks.release(p, vm.uuid, chosen.uuid)
            raise
        await set_state(p, vm.uuid, state="Running", lastHostUuid=chosen.uuid)
        return await vm_inv(ctx, vm.uuid)


async def start_candidates(
    s: Tx, vm: m.VmInstance, wanted: str | None, cluster: str | None, every: bool = False
) -> list[Row[Any]]:
    """The hosts a stopped VM may start on, its last host first: with volumes on local storage
    where they live; on shared storage anywhere its storage is attached."""
    bound, ps_uuids = await volume_placement(s, vm.uuid)
    if wanted and bound and wanted != bound:
        raise not_allowed(
            f"VM {vm.uuid}'s volumes are on the local storage of host {bound}; it cannot start on host "
            f"{wanted}. Migrate its root volume there first (LocalStorageMigrateVolume)"
        )
    # its last host is the one to try first, not the only one (unless its volumes are bound there)
    wanted = wanted or bound or (vm.lastHostUuid if not ps_uuids and not every else None)
    l3s = list((await s.execute(select(m.VmNic.l3NetworkUuid).where(m.VmNic.vmInstanceUuid == vm.uuid))).scalars())
    cpu = vm.cpuNum * vm.cpuSpeed
    hosts = await candidate_hosts(s, cpu, vm.memorySize, l3s, None, cluster, wanted, ps_uuids, every)
    hosts.sort(key=lambda h: h.uuid != vm.lastHostUuid)
    return hosts


async def stop_on_host(p: Platform, vm: m.VmInstance, graceful: bool = True) -> None:
    """Stop the domain and release the host's capacity; the VM ends Stopped."""
    await set_state(p, vm.uuid, state="Stopping")
    try:
        await agent(p, vm.hostUuid, "/vm/stop", {"vmUuid": vm.uuid, "graceful": graceful, "timeout": 60})
    except BaseException:
        await set_state(p, vm.uuid, state=vm.state)
        raise
    await hooks.release(p, vm.uuid, vm.hostUuid, strict=True)
    async with p.db.tx() as s:
        await give_back_host(s, vm.hostUuid, vm.cpuNum * vm.cpuSpeed, vm.memorySize)
        await s.execute(
            update(m.VmInstance)
            .where(m.VmInstance.uuid == vm.uuid)
            .values(state="Stopped", hostUuid=None, lastHostUuid=vm.hostUuid)
        )


@api("StopVmInstance")
async def stop_vm(ctx: ApiContext) -> dict[str, Any]:
    vm = await vm_for(ctx)
    async with ctx.p.queues.serial(vm.uuid):
        vm = await vm_for(ctx, vm.uuid)
        if vm.state == "Stopped":
            return await vm_inv(ctx, vm.uuid)
        need_state(vm, "Running", "Paused", "Unknown")
        await stop_on_host(ctx.p, vm)
        return await vm_inv(ctx, vm.uuid)


@api("RebootVmInstance")
async def reboot_vm(ctx: ApiContext) -> dict[str, Any]:
    vm = await vm_for(ctx)
    async with ctx.p.queues.serial(vm.uuid):
        vm = await vm_for(ctx, vm.uuid)
        need_state(vm, "Running")
        if await _installing_from_iso(ctx.p, vm.uuid):
            await boot_from_disk_after_install(ctx.p, vm)
            return await vm_inv(ctx, vm.uuid)
        await set_state(ctx.p, vm.uuid, state="Rebooting")
        try:
            await agent(ctx.p, vm.hostUuid, "/vm/reboot", {"vmUuid": vm.uuid})
        finally:
            await set_state(ctx.p, vm.uuid, state="Running")
        return await vm_inv(ctx, vm.uuid)


# Marks a VM created from an ISO whose boot order is still the install default (CdRom first).


async def _installing_from_iso(p: Platform, vm_uuid: str) -> bool:
    async with p.db.tx() as s:
        return ISO_INSTALL_TAG in await system_tags(s, vm_uuid)


async def boot_from_disk_after_install(p: Platform, vm: m.VmInstance) -> None:
    """The spec's rule: a VM created from an ISO boots from CdRom until it reboots after the
    install, then from HardDisk. A reset keeps QEMU's boot order, so restart the domain cold."""
    async with p.db.tx() as s:
        await s.execute(
            delete(m.SystemTag).where(m.SystemTag.resourceUuid == vm.uuid, m.SystemTag.tag == ISO_INSTALL_TAG)
        )
        await s.execute(
            update(m.VmInstance).where(m.VmInstance.uuid == vm.uuid).values(bootOrder="HardDisk", state="Rebooting")
        )
    try:
        await agent(p, vm.hostUuid, "/vm/stop", {"vmUuid": vm.uuid, "graceful": False, "timeout": 0})
        await agent(p, vm.hostUuid, "/vm/start", {"vm": asdict(await build_spec(p, vm.uuid))})
    finally:
        await set_state(p, vm.uuid, state="Running")


async def on_guest_reboot(p: Platform, vm_uuid: str) -> None:
    """The guest reset itself; an ISO install is over when that happens."""
    async with p.queues.serial(vm_uuid):
        async with p.db.tx() as s:
            vm = await s.get(m.VmInstance, vm_uuid)
        if vm is not None and vm.state == "Running" and await _installing_from_iso(p, vm_uuid):
            log.info("VM %s rebooted after installing from its ISO; it boots from its disk now", vm_uuid)
            await boot_from_disk_after_install(p, vm)


@api("UpdateVmInstance")
async def update_vm(ctx: ApiContext) -> dict[str, Any]:
    """Name, description, platform and default network; ``state`` is the admin's repair of a VM
    whose host lost track of it (Unknown): Running if it runs there, Stopped if not (its host's
    capacity and network services are given back). Other state changes are Start/StopVmInstance's."""
    p = ctx.p
    vm = await vm_for(ctx)
    async with p.queues.serial(vm.uuid):
        async with p.db.tx() as s:
            vm = await load(s, m.VmInstance, vm.uuid, ctx, "VmInstance", owned=True)
            update_fields(vm, ctx, ("name", "description", "platform"))
            old_default, new_default = vm.defaultL3NetworkUuid, ctx.str("defaultL3NetworkUuid")
            if new_default:
                nics = set(
                    (await s.execute(select(m.VmNic.l3NetworkUuid).where(m.VmNic.vmInstanceUuid == vm.uuid))).scalars()
                )
                if new_default not in nics:
                    raise invalid("defaultL3NetworkUuid must be an L3 network the VM has a NIC on")
                vm.defaultL3NetworkUuid = new_default
            state, was, host = ctx.str("state"), vm.state, vm.hostUuid
            if state and not ctx.caller.is_admin:
                raise not_allowed("only an admin sets a VM's state; StartVmInstance and StopVmInstance change it")
            if state and state != vm.state:
                if vm.state != "Unknown":
                    raise not_allowed(
                        f"VM {vm.uuid} is {vm.state}: its state is set only while Unknown; "
                        "StartVmInstance and StopVmInstance change it"
                    )
                vm.state = state
                if state == "Stopped":
                    await give_back_host(s, host, vm.cpuNum * vm.cpuSpeed, vm.memorySize)
                    vm.hostUuid, vm.lastHostUuid = None, host or vm.lastHostUuid
        if was == "Unknown" and ctx.str("state") == "Stopped":
            with deadline.grace():
                await hooks.release(p, vm.uuid, host)
        elif vm.state == "Running" and host and new_default and new_default != old_default:
            # the default route goes with the default network's lease
            for l3_uuid in filter(None, (old_default, new_default)):
                await hooks.nic_changed(p, vm.uuid, host, l3_uuid)
    return await vm_inv(ctx, vm.uuid)


@api("GetVmConsoleAddress")
async def console_address(ctx: ApiContext) -> dict[str, Any]:
    vm = await vm_for(ctx)
    need_state(vm, "Running", "Paused")
    reply = await agent(ctx.p, vm.hostUuid, "/vm/console", {"vmUuid": vm.uuid})
    return {"hostIp": reply["hostIp"], "port": reply["port"], "protocol": reply["protocol"]}


@api("GetVmBootOrder")
async def get_boot_order(ctx: ApiContext) -> dict[str, Any]:
    vm = await vm_for(ctx)
    return {"orders": vm.bootOrder.split(",")}


@api("SetVmBootOrder")
async def set_boot_order(ctx: ApiContext) -> dict[str, Any]:
    order = ctx.list("bootOrder") or ["HardDisk"]
    bad = [o for o in order if o not in ("HardDisk", "CdRom")]
    if bad or len(set(order)) != len(order):
        raise invalid(f"bootOrder must list HardDisk and/or CdRom once each, got {','.join(map(str, order))}")
    vm = await vm_for(ctx)
    async with ctx.p.queues.serial(vm.uuid):
        await set_state(ctx.p, vm.uuid, bootOrder=",".join(order))
        async with ctx.p.db.tx() as s:  # an explicit order ends the ISO-install default
            await s.execute(
                delete(m.SystemTag).where(m.SystemTag.resourceUuid == vm.uuid, m.SystemTag.tag == ISO_INSTALL_TAG)
            )
    return await vm_inv(ctx, vm.uuid)


@api("AttachIsoToVmInstance")
async def attach_iso(ctx: ApiContext) -> dict[str, Any]:
    vm = await vm_for(ctx, ctx.req("vmInstanceUuid"))
    async with ctx.p.db.tx() as s:
        iso = await load(s, m.Image, ctx.req("isoUuid"), ctx, "Image")
    if iso.mediaType != "ISO" or iso.status != "Ready":
        raise invalid(f"image {iso.uuid} is a {iso.mediaType} ({iso.status}); AttachIsoToVmInstance needs a Ready ISO")
    async with ctx.p.queues.serial(vm.uuid):
        vm = await vm_for(ctx, vm.uuid)
        need_state(vm, "Running", "Stopped")
        if vm.isoUuid and vm.isoUuid != iso.uuid:
            raise not_allowed(f"VM {vm.uuid} already has ISO {vm.isoUuid} attached; detach it first")
        if vm.state == "Running":
            path = await cached_image_path(ctx.p, vm.hostUuid, iso.uuid)
            await agent(ctx.p, vm.hostUuid, "/vm/attach-iso", {"vmUuid": vm.uuid, "isoPath": path})
        # the boot order stays as it is (spec 1.0 §4.5): SetVmBootOrder changes it
        await set_state(ctx.p, vm.uuid, isoUuid=iso.uuid)
    return await vm_inv(ctx, vm.uuid)


@api("DetachIsoFromVmInstance")
async def detach_iso(ctx: ApiContext) -> dict[str, Any]:
    vm = await vm_for(ctx, ctx.req("vmInstanceUuid"))
    async with ctx.p.queues.serial(vm.uuid):
        vm = await vm_for(ctx, vm.uuid)
        need_state(vm, "Running", "Stopped")
        if vm.isoUuid is None:
            return await vm_inv(ctx, vm.uuid)
        if vm.state == "Running":
            await agent(ctx.p, vm.hostUuid, "/vm/detach-iso", {"vmUuid": vm.uuid})
        await set_state(ctx.p, vm.uuid, isoUuid=None)
    return await vm_inv(ctx, vm.uuid)
