"""Live migration of a running VM to another host: MigrateVm, GetVmMigrationCandidateHosts.

The VM's volumes must be on storage both hosts reach (SharedMountPoint); on LocalStorage the VM
is stopped, its root volume moved (LocalStorageMigrateVolume) and the VM started again. With
``kvm vm.cpuMode`` host-model or host-passthrough the guest sees its host's CPU, so hosts whose
CPU models differ (as their agents reported at connect) are refused (release 1.0 §9).

Real hosts: the destination's agent first plugs in what the incoming domain needs (its bridges,
its console log); then the source agent asks libvirt to migrate the domain peer to peer to
``qemu+tcp://<destination managementIp>/system`` (libvirtd must listen on TCP there, as for
ZStack), the memory streaming to ``tcp://<destination managementIp>``. If the source agent fails
meanwhile, libvirt carries on without it, so the destination decides: a VM running there has
moved. Network services follow the VM once it runs on the destination. Simulated hosts: the
simulator agent moves the domain and records the move."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from nimbostack.compute import allocator
from nimbostack.compute.vmspec import build_spec
from nimbostack.core import gc, hooks
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import ALLOCATION_FAILED, ApiError, not_allowed
from nimbostack.core.flow import FlowChain
from nimbostack.core.hosts import agent
from nimbostack.core.resources import inv, load
from nimbostack.db import models as m
from nimbostack.storage import backend

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

# How long a migration whose source agent failed may still take to finish on the destination.
ARRIVAL_WAIT = 300.0

CPU_MODE_WARNING = (
    "setting this value to host-model or host-passthrough may break live migration if CPU models are "
    "different on two hosts"
)


async def _check_storage(s: Any, vm: m.VmInstance) -> set[str]:
    """The VM's primary storages; refuses storage that ties volumes to one host."""
    vols = (await s.execute(select(m.Volume).where(m.Volume.vmInstanceUuid == vm.uuid))).scalars().all()
    ps_uuids: set[str] = set()
    for vol in vols:
        ps = await s.get(m.PrimaryStorage, vol.primaryStorageUuid) if vol.primaryStorageUuid else None
        if ps is None:
            continue
        if ps.type not in backend.BACKENDS or backend.of(ps).host_bound:
            raise not_allowed(
                f"VM {vm.uuid} cannot migrate live: its {vol.type.lower()} volume {vol.uuid} is on {ps.type} primary "
                f"storage {ps.uuid}, which only host {vol.hostUuid} reaches. Stop the VM, move its volumes with "
                "LocalStorageMigrateVolume and start it on the other host"
            )
        ps_uuids.add(ps.uuid)
    return ps_uuids


async def _candidates(p: Platform, s: Any, vm: m.VmInstance, dest_uuid: str | None) -> list[m.Host]:
    if vm.state != "Running":
        raise not_allowed(f"VM {vm.uuid} is {vm.state}; only a Running VM migrates live (StartVmInstance "
                          "hostUuid= starts a stopped one elsewhere)")
    ps_uuids = await _check_storage(s, vm)
    source = await s.get(m.Host, vm.hostUuid)
    assert source is not None
    l3s = list((await s.execute(select(m.VmNic.l3NetworkUuid).where(m.VmNic.vmInstanceUuid == vm.uuid))).scalars())
    cpu = vm.cpuNum * vm.cpuSpeed
    hosts = await allocator.candidate_hosts(s, cpu, vm.memorySize, l3s, vm.zoneUuid, None, dest_uuid, ps_uuids)
    hosts = [h for h in hosts if h.uuid != source.uuid and h.hypervisorType == source.hypervisorType]
    mode = await p.config.get("kvm", "vm.cpuMode")
    if dest_uuid:
        dest = await s.get(m.Host, dest_uuid)
        if dest is None:
            raise ApiError("SYS.1006", "Unable to find the resource", f"Host[uuid:{dest_uuid}] does not exist")
        if dest.uuid == source.uuid:
            raise not_allowed(f"VM {vm.uuid} runs on host {dest.uuid} already")
        if dest.hypervisorType != source.hypervisorType:
            raise not_allowed(f"host {dest.uuid} is a {dest.hypervisorType} host; VM {vm.uuid} runs on "
                              f"{source.hypervisorType}")
        if dest.hypervisorType != "Simulator" and dest.managementIp == source.managementIp:
            raise not_allowed(
                f"hosts {source.uuid} and {dest.uuid} are one machine (managementIp {dest.managementIp}); live "
                "migration moves a VM between two machines' hypervisors"
            )
        if mode in ("host-model", "host-passthrough") and (dest.cpuModel or "") != (source.cpuModel or ""):
            raise not_allowed(
                f"kvm vm.cpuMode is {mode}: {CPU_MODE_WARNING} (host {source.uuid}: {source.cpuModel or 'unknown'}; "
                f"host {dest.uuid}: {dest.cpuModel or 'unknown'}). Set vm.cpuMode to none, or pick a host with "
                "the same CPU model"
            )
        if not hosts:
            raise ApiError(
                ALLOCATION_FAILED,
                "The VM cannot migrate to this host",
                f"host {dest.uuid} must be Connected and Enabled, in an Enabled cluster that reaches the VM's L3 "
                f"networks and primary storage, with {cpu} MHz CPU and {vm.memorySize} bytes memory free",
            )
    elif mode in ("host-model", "host-passthrough"):
        hosts = [h for h in hosts if (h.cpuModel or "") == (source.cpuModel or "")]
    return hosts


async def _arrived(p: Platform, vm_uuid: str, dest_uuid: str) -> bool:
    """Whether the VM runs on the destination after its source agent failed mid-migration. The
    hypervisors go on without the agent (libvirt runs the migration itself), so the destination is
    asked: while its copy is paused the stream is still coming; running means it came, absent
    means the source kept it. A destination that cannot say counts as not arrived: the VM is
    rolled back to its source, and the next reconnect of either host corrects that if wrong."""
    deadline = asyncio.get_running_loop().time() + ARRIVAL_WAIT
    while True:
        try:
            states = (await agent(p, dest_uuid, "/vm/states", {}))["states"]
        except Exception as err:
            log.warning("VM %s: cannot ask host %s whether the migration finished: %s", vm_uuid, dest_uuid, err)
            return False
        state = states.get(vm_uuid)
        if state != "Paused" or asyncio.get_running_loop().time() > deadline:
            return state == "Running"
        await asyncio.sleep(0.5)


@api("GetVmMigrationCandidateHosts")
async def candidate_hosts(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        vm = await load(s, m.VmInstance, ctx.req("vmInstanceUuid"), ctx, "VmInstance", owned=True)
        hosts = await _candidates(ctx.p, s, vm, None)
        return {"inventories": [await inv(s, "QueryObjectHostInventory", h) for h in hosts]}


@api("MigrateVm")
async def migrate_vm(ctx: ApiContext) -> dict[str, Any]:
    p = ctx.p
    async with p.db.tx() as s:
        vm = await load(s, m.VmInstance, ctx.req("vmInstanceUuid"), ctx, "VmInstance", owned=True)
    async with p.queues.serial(vm.uuid):
        cpu = vm.cpuNum * vm.cpuSpeed

        async def reserve(c: dict[str, Any]) -> None:
            async with p.db.tx() as s:
                row = await load(s, m.VmInstance, vm.uuid, ctx)
                hosts = await _candidates(p, s, row, ctx.str("hostUuid"))
                dest = await allocator.take_host(s, hosts, cpu, row.memorySize)
                c.update(source=row.hostUuid, dest=dest.uuid, dest_ip=dest.managementIp, cluster=dest.clusterUuid)
                row.state = "Migrating"

        async def unreserve(c: dict[str, Any]) -> None:
            async with p.db.tx() as s:
                await allocator.give_back_host(s, c["dest"], cpu, vm.memorySize)
                await s.execute(update(m.VmInstance).where(m.VmInstance.uuid == vm.uuid).values(state="Running"))

        async def prepare(c: dict[str, Any]) -> None:
            spec = asdict(await build_spec(p, vm.uuid))
            reply = await agent(p, c["dest"], "/vm/prepare-migration", {"vm": spec})
            c["console_log"] = reply.get("consoleLog")

        async def move(c: dict[str, Any]) -> None:
            try:
                await agent(p, c["source"], "/vm/migrate", {
                    "vmUuid": vm.uuid, "destHostUuid": c["dest"], "destUri": f"qemu+tcp://{c['dest_ip']}/system",
                    "destConsoleLog": c["console_log"]})
            except Exception as err:
                if not await _arrived(p, vm.uuid, c["dest"]):
                    raise
                why = getattr(err, "details", None) or str(err)
                log.warning("VM %s: the source host's agent failed (%s), but the VM runs on host %s: the "
                            "migration finished", vm.uuid, why, c["dest"])
                # libvirt undefines the source's copy only when its migration job ends cleanly; a copy
                # left there (shut off) is removed by the GC once the source's agent answers again
                await gc.submit(p, gc.DESTROY_VM, c["source"], "/vm/destroy", {"vmUuid": vm.uuid},
                                f"VM migrated to host {c['dest']} while this host's agent failed: {why}", vm.uuid)

        async def switch(c: dict[str, Any]) -> None:
            async with p.db.tx() as s:
                await allocator.give_back_host(s, c["source"], cpu, vm.memorySize)
                await s.execute(update(m.VmInstance).where(m.VmInstance.uuid == vm.uuid).values(
                    state="Running", hostUuid=c["dest"], lastHostUuid=c["dest"], clusterUuid=c["cluster"]))

        c = await (
            FlowChain("migrate-vm").then("reserve", reserve, unreserve)
            .then("prepare", prepare)
            .then("migrate", move)
            .then("switch", switch)
            .run({})
        )
        source, dest_uuid = c["source"], c["dest"]
        # network services follow the VM: its entries on the new host, gone from the old one
        # the domain already runs on the new host: each extension is tried there, whatever the others do
        for ext in hooks.VM_START:
            try:
                await hooks.prepare_one(p, ext, vm.uuid, dest_uuid)
            except Exception as err:
                log.warning("VM %s migrated to host %s, but %s failed there: %s", vm.uuid, dest_uuid, ext.name, err)
        await hooks.release(p, vm.uuid, source)
        async with p.db.tx() as s:
            return {"inventory": await inv(s, "QueryObjectVmInstanceInventory", await s.get(m.VmInstance, vm.uuid))}
