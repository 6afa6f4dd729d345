"""What a VM is made of, changed or asked after its creation: its instance offering, its host
name, where it may start and what it can do."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select

from nimbostack.compute.vm import need_state, set_state, vm_for, vm_inv
from nimbostack.compute.vm_lifecycle import start_candidates
from nimbostack.core import hooks, query
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import not_allowed
from nimbostack.core.resources import add_tags, load
from nimbostack.core.tags import system_tags, tag_value
from nimbostack.db import models as m
from nimbostack.storage import backend

HOSTNAME_PREFIX = "hostname::"


@api("ChangeInstanceOffering")
async def change_instance_offering(ctx: ApiContext) -> dict[str, Any]:
    """The stopped VM takes the offering's CPUs, speed and memory at its next start. A running
    VM is refused: its libvirt domain is defined with exactly the vCPUs and memory it boots with
    (no ``maxvcpus`` headroom, no memory hot-plug slots), so libvirt can only shrink it live
    (balloon), never grow it, and the management node would not know which of the two it got."""
    p = ctx.p
    vm = await vm_for(ctx, ctx.req("vmInstanceUuid"))
    async with p.db.tx() as s:
        offering = await load(s, m.InstanceOffering, ctx.req("instanceOfferingUuid"), ctx, "InstanceOffering")
    if offering.state != "Enabled":
        raise not_allowed(f"instance offering {offering.uuid} is {offering.state}")
    if offering.type != vm.type and vm.type == "UserVm":
        raise not_allowed(f"instance offering {offering.uuid} is for {offering.type} VMs, not {vm.type}")
    async with p.queues.serial(vm.uuid):
        vm = await vm_for(ctx, vm.uuid)
        if vm.state == "Running":
            raise not_allowed(
                f"VM {vm.uuid} is Running: stop it to change its instance offering (a running guest's "
                "vCPUs and memory cannot grow on its host); the new offering applies at its next start"
            )
        need_state(vm, "Stopped")
        await set_state(
            p,
            vm.uuid,
            instanceOfferingUuid=offering.uuid,
            cpuNum=offering.cpuNum,
            cpuSpeed=offering.cpuSpeed,
            memorySize=offering.memorySize,
            allocatorStrategy=offering.allocatorStrategy,
        )
    return await vm_inv(ctx, vm.uuid)


@api("GetVmStartingCandidateClustersHosts")
async def starting_candidates(ctx: ApiContext) -> dict[str, Any]:
    """Every host (and its cluster) the stopped VM could start on now, as StartVmInstance chooses."""
    vm = await vm_for(ctx)
    need_state(vm, "Stopped")
    async with ctx.p.db.tx() as s:
        hosts = await start_candidates(s, vm, None, None, every=True)
        cluster_uuids = sorted({h.clusterUuid for h in hosts})
        clusters = (await s.execute(select(m.Cluster).where(m.Cluster.uuid.in_(cluster_uuids)))).scalars().all()
        return {
            "hostInventories": await query.inventories(s, query.TARGETS["QueryObjectHostInventory"], hosts),
            "clusterInventories": [await query.inventory(s, "QueryObjectClusterInventory", c) for c in clusters],
        }


@api("GetVmCapabilities")
async def vm_capabilities(ctx: ApiContext) -> dict[str, Any]:
    """LiveMigration: every volume is on storage other hosts reach (MigrateVm); VolumeMigration:
    a volume lives on a host's local storage (LocalStorageMigrateVolume moves it)."""
    vm = await vm_for(ctx)
    async with ctx.p.db.tx() as s:
        kinds = (
            await s.execute(
                select(m.PrimaryStorage.type)
                .join(m.Volume, m.Volume.primaryStorageUuid == m.PrimaryStorage.uuid)
                .where(m.Volume.vmInstanceUuid == vm.uuid)
            )
        ).scalars().all()
    bound = [k in backend.BACKENDS and backend.of(k).host_bound for k in kinds]
    return {"capabilities": {"LiveMigration": bool(kinds) and not any(bound), "VolumeMigration": any(bound)}}


async def _set_hostname_tag(ctx: ApiContext, vm_uuid: str, hostname: str | None) -> None:
    async with ctx.p.db.tx() as s:
        await s.execute(
            delete(m.SystemTag).where(
                m.SystemTag.resourceUuid == vm_uuid, m.SystemTag.tag.startswith(HOSTNAME_PREFIX)
            )
        )
        if hostname is not None:
            await add_tags(s, vm_uuid, "VmInstanceVO", [f"{HOSTNAME_PREFIX}{hostname}"], [])
    # the VM's DHCP entries carry its host name (the Flat provider re-pushes them)
    await hooks.tags_changed(ctx, "VmInstanceVO", vm_uuid)


@api("SetVmHostname")
async def set_hostname(ctx: ApiContext) -> dict[str, Any]:
    """The host name the VM's DHCP leases give it; unique on each of its L3 networks, where two
    guests of one name would take each other's DNS entry."""
    vm = await vm_for(ctx)
    hostname = ctx.req("hostname")
    async with ctx.p.queues.serial(vm.uuid):
        async with ctx.p.db.tx() as s:
            mine = select(m.VmNic.l3NetworkUuid).where(m.VmNic.vmInstanceUuid == vm.uuid)
            clash = (
                await s.execute(
                    select(m.SystemTag.resourceUuid)
                    .join(m.VmNic, m.VmNic.vmInstanceUuid == m.SystemTag.resourceUuid)
                    .where(
                        m.SystemTag.tag == f"{HOSTNAME_PREFIX}{hostname}",
                        m.SystemTag.resourceUuid != vm.uuid,
                        m.VmNic.l3NetworkUuid.in_(mine),
                    )
                )
            ).first()
        if clash is not None:
            raise not_allowed(f"host name {hostname} is taken by VM {clash[0]} on an L3 network of VM {vm.uuid}")
        await _set_hostname_tag(ctx, vm.uuid, hostname)
    return {}


@api("GetVmHostname")
async def get_hostname(ctx: ApiContext) -> dict[str, Any]:
    vm = await vm_for(ctx)
    async with ctx.p.db.tx() as s:
        hostname = tag_value(await system_tags(s, vm.uuid), HOSTNAME_PREFIX)
    return {"hostname": hostname} if hostname else {}


@api("DeleteVmHostname")
async def delete_hostname(ctx: ApiContext) -> dict[str, Any]:
    vm = await vm_for(ctx)
    async with ctx.p.queues.serial(vm.uuid):
        await _set_hostname_tag(ctx, vm.uuid, None)
    return {}
