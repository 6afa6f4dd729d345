"""Deleting VMs: destroy, expunge (now and when due) and recover."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from nimbostack.compute.allocator import new_mac, release_all
from nimbostack.compute.vm import need_state, set_state, static_ips, vm_for, vm_inv
from nimbostack.core import expunger, gc, hooks
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import IP_ALLOCATION_FAILED, ApiError, not_allowed
from nimbostack.core.resources import (
    disown,
    new_uuid,
)
from nimbostack.db import models as m
from nimbostack.network import ipam
from nimbostack.storage.volume import delete_volume, delete_volume_files

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)


@api("DestroyVmInstance")
async def destroy_vm(ctx: ApiContext) -> dict[str, Any]:
    p = ctx.p
    vm = await vm_for(ctx)
    async with p.queues.serial(vm.uuid):
        vm = await vm_for(ctx, vm.uuid)
        if vm.state == "Destroyed":
            return {}
        if vm.state != "Created":
            need_state(vm, "Running", "Stopped", "Paused", "Unknown")
        await destroy(p, vm)
        return {}


async def destroy(p: Platform, vm: m.VmInstance) -> None:
    """Destroy the VM by the vm/deletionPolicy. Its host capacity, IPs and NICs are freed at once;
    Direct expunges it too, Delay and Never keep it Destroyed (recoverable) with its root volume.
    A host that cannot be reached does not stop it: the domain's destruction goes to the GC."""
    policy = await p.config.get("vm", "deletionPolicy")
    if vm.hostUuid and vm.state in ("Running", "Paused", "Unknown", "Created"):
        await set_state(p, vm.uuid, state="Destroying")
        try:
            await gc.call_or_defer(p, gc.DESTROY_VM, vm.hostUuid, "/vm/destroy", {"vmUuid": vm.uuid}, vm.uuid)
        except BaseException:
            await set_state(p, vm.uuid, state=vm.state)
            raise
        # the domain is gone: a network service left behind is cleaned on the host's reconnect
        await hooks.release(p, vm.uuid, vm.hostUuid)
    async with p.db.tx() as s:
        data = list(
            (
                await s.execute(
                    select(m.Volume.uuid).where(m.Volume.vmInstanceUuid == vm.uuid, m.Volume.type == "Data")
                )
            ).scalars()
        )
        await s.execute(
            update(m.Volume)
            .where(m.Volume.vmInstanceUuid == vm.uuid, m.Volume.type == "Data")
            .values(vmInstanceUuid=None, deviceId=None)
        )
        nics = (
            (await s.execute(select(m.VmNic).where(m.VmNic.vmInstanceUuid == vm.uuid).order_by(m.VmNic.deviceId)))
            .scalars()
            .all()
        )
        saved = [{"l3NetworkUuid": n.l3NetworkUuid, "ip": n.ip, "mac": n.mac, "deviceId": n.deviceId} for n in nics]
        await release_all(s, vm.uuid, release_volumes=False)
        await s.execute(
            update(m.VmInstance)
            .where(m.VmInstance.uuid == vm.uuid)
            .values(
                state="Destroyed",
                destroyDate=datetime.utcnow(),
                destroyedNics=json.dumps(saved),
                lastHostUuid=vm.hostUuid or vm.lastHostUuid,
            )
        )
    if data and await p.config.get("vm", "dataVolume.deleteOnVmDestroy"):
        for vol_uuid in data:
            async with p.queues.serial(vol_uuid):
                await delete_volume(p, vol_uuid)
    if policy == "Direct":
        try:
            await expunge(p, vm.uuid)
        except ApiError as err:  # the VM is Destroyed already; the expunger tries again
            log.warning("VM %s destroyed, but expunging it failed (the expunger retries): %s", vm.uuid, err)


async def expunge(p: Platform, vm_uuid: str) -> None:
    """Remove the VM's root volume file (through the GC if its host is unreachable) and every row
    of it; its data volumes are detached and stay."""
    async with p.db.tx() as s:
        vm = await s.get(m.VmInstance, vm_uuid)
        if vm is None:
            return
        root = await s.get(m.Volume, vm.rootVolumeUuid) if vm.rootVolumeUuid else None
    if root is not None:
        await delete_volume_files(p, root.uuid, vm.lastHostUuid)
    async with p.db.tx() as s:
        await s.execute(
            update(m.Volume)
            .where(m.Volume.vmInstanceUuid == vm_uuid, m.Volume.type == "Data")
            .values(vmInstanceUuid=None, deviceId=None)
        )
        await release_all(s, vm_uuid, release_volumes=True)
        row = await s.get(m.VmInstance, vm_uuid)
        if row is not None:
            await s.delete(row)
        await disown(s, [vm_uuid])


@api("ExpungeVmInstance")
async def expunge_vm(ctx: ApiContext) -> dict[str, Any]:
    vm = await vm_for(ctx)
    async with ctx.p.queues.serial(vm.uuid):
        vm = await vm_for(ctx, vm.uuid)
        need_state(vm, "Destroyed")
        await expunge(ctx.p, vm.uuid)
    return {}


async def _expunge_due(p: Platform, cutoff: datetime) -> list[str]:
    async with p.db.tx() as s:
        return list(
            (
                await s.execute(
                    select(m.VmInstance.uuid).where(
                        m.VmInstance.state == "Destroyed", m.VmInstance.destroyDate < cutoff
                    )
                )
            ).scalars()
        )


async def _expunge_one(p: Platform, vm_uuid: str) -> None:
    async with p.queues.serial(vm_uuid):
        async with p.db.tx() as s:
            vm = await s.get(m.VmInstance, vm_uuid)
        if vm is not None and vm.state == "Destroyed":
            await expunge(p, vm_uuid)


expunger.register(expunger.Expungeable("vm", _expunge_due, _expunge_one))


async def _holder(s: Any, l3_uuid: str, ip: str) -> str:
    vm_uuid = (
        await s.execute(select(m.VmNic.vmInstanceUuid).where(m.VmNic.l3NetworkUuid == l3_uuid, m.VmNic.ip == ip))
    ).scalar_one_or_none()
    return f"VM {vm_uuid}" if vm_uuid else "another user of the network"


@api("RecoverVmInstance")
async def recover_vm(ctx: ApiContext) -> dict[str, Any]:
    """Destroyed → Stopped with its root volume; a NIC again on each of its L3 networks. A static
    IP (``staticIp::`` tag) must be free; otherwise the old IP is taken back if free, or a new one."""
    vm = await vm_for(ctx)
    async with ctx.p.queues.serial(vm.uuid):
        vm = await vm_for(ctx, vm.uuid)
        need_state(vm, "Destroyed")
        async with ctx.p.db.tx() as s:
            row = await s.get(m.VmInstance, vm.uuid)
            root = await s.get(m.Volume, row.rootVolumeUuid) if row.rootVolumeUuid else None
            if root is None:
                raise not_allowed(f"VM {vm.uuid} cannot be recovered: its root volume no longer exists")
            if row.destroyedNics:
                saved = json.loads(row.destroyedNics)
            else:  # destroyed before the NICs were kept: its default network
                saved = [{"l3NetworkUuid": row.defaultL3NetworkUuid}] if row.defaultL3NetworkUuid else []
            static = await static_ips(s, vm.uuid)
            for device_id, old in enumerate(saved):
                l3_uuid = old["l3NetworkUuid"]
                if await s.get(m.L3Network, l3_uuid) is None:
                    raise not_allowed(f"VM {vm.uuid} cannot be recovered: its L3 network {l3_uuid} no longer exists")
                wanted = static.get(l3_uuid)
                if wanted:
                    try:
                        used = await ipam.allocate(s, l3_uuid, wanted)
                    except ApiError as err:
                        if err.code != IP_ALLOCATION_FAILED:
                            raise
                        raise ApiError(
                            IP_ALLOCATION_FAILED,
                            "The VM's IP is taken",
                            f"VM {vm.uuid} cannot be recovered: its static IP {wanted} on L3 network {l3_uuid} "
                            f"is used by {await _holder(s, l3_uuid, wanted)}",
                        ) from None
                else:
                    used = None
                    if old.get("ip"):
                        try:
                            used = await ipam.allocate(s, l3_uuid, old["ip"])
                        except ApiError:
                            used = None  # taken meanwhile, or its range is gone: any free IP will do
                    if used is None:
                        used = await ipam.allocate(s, l3_uuid)
                mac = old.get("mac")
                if not mac or (await s.execute(select(m.VmNic.uuid).where(m.VmNic.mac == mac))).first():
                    mac = new_mac()
                s.add(
                    m.VmNic(
                        uuid=new_uuid(),
                        vmInstanceUuid=vm.uuid,
                        l3NetworkUuid=l3_uuid,
                        ip=used.ip,
                        mac=mac,
                        netmask=used.netmask,
                        gateway=used.gateway,
                        deviceId=old.get("deviceId", device_id),
                        usedIpUuid=used.uuid,
                    )
                )
            row.state, row.destroyDate, row.destroyedNics, row.hostUuid = "Stopped", None, None, None
        return await vm_inv(ctx, vm.uuid)
