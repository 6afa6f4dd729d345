"""What the agent is told to run: the VmSpec of a VM, its image source and the image cache on its host."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, bindparam, select
from sqlalchemy.exc import NoResultFound

from nimbostack.core.errors import not_allowed
from nimbostack.core.hosts import agent
from nimbostack.db import models as m
from nimbostack.db.engine import Tx, columns, get_row
from nimbostack.network.l2l3 import BRIDGE_TAG, bridge_of
from nimbostack.storage import primary
from nimbostack.storage.backup import copy_source as image_source
from nimbostack.wire import NicSpec, VmSpec

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

# the system tag of a VM booting from its ISO until the install reboots it (then: from its disk)
ISO_INSTALL_TAG = "bootOrder::installingFromIso"


_VOLUMES = select(*columns(m.Volume)).order_by(m.Volume.deviceId)
VOLUMES_OF_VMS = _VOLUMES.where(m.Volume.vmInstanceUuid.in_(bindparam("vms", expanding=True)))
# one VM's (every create and start asks): an IN list of one is rendered anew at every execution
VOLUMES_OF_VM = _VOLUMES.where(m.Volume.vmInstanceUuid == bindparam("vm"))


# each NIC with its L2 network and that network's bridge tag in one statement, not more per NIC
# (every start asks); the L2's columns are named as its own, which l2l3.bridge_of reads
_NICS_WITH_L2 = (
    select(
        m.VmNic.uuid,
        m.VmNic.mac,
        m.VmNic.deviceId,
        m.VmNic.ip,
        m.VmNic.netmask,
        m.VmNic.gateway,
        m.VmNic.l3NetworkUuid,
        m.L2Network.uuid.label("l2Uuid"),
        m.L2Network.physicalInterface,
        m.L2Network.vlan,
        BRIDGE_TAG,
    )
    .outerjoin(m.L3Network, m.L3Network.uuid == m.VmNic.l3NetworkUuid)
    .outerjoin(m.L2Network, m.L2Network.uuid == m.L3Network.l2NetworkUuid)
)
_NICS_OF_VM_WITH_L2 = _NICS_WITH_L2.where(m.VmNic.vmInstanceUuid == bindparam("vm")).order_by(m.VmNic.deviceId)
_NIC_WITH_L2 = _NICS_WITH_L2.where(m.VmNic.uuid == bindparam("nic"))


def _nic_spec(n: Row[Any]) -> NicSpec:
    if n.l2Uuid is None:  # as the per-NIC scalar_one() this replaces did: a NIC on a vanished network
        raise NoResultFound("No row was found when one was required")
    return NicSpec(
        n.uuid,
        n.mac,
        bridge_of(n, n.bridgeTag),
        n.deviceId,
        n.ip or "",
        n.netmask or "",
        n.gateway or "",
        n.l3NetworkUuid,
        n.physicalInterface,
        n.vlan,
    )


async def nic_spec(s: Tx, nic_uuid: str) -> NicSpec:
    """What the agent is told of one NIC to hot-plug or unplug: as a start tells it."""
    return _nic_spec((await s.execute(_NIC_WITH_L2, {"nic": nic_uuid})).one())


async def build_spec(platform: Platform, vm_uuid: str) -> VmSpec:
    cache = await platform.config.get("kvm", "vm.cacheMode")
    async with platform.db.tx() as s:
        vm = await get_row(s, m.VmInstance, vm_uuid)
        assert vm is not None
        vols = (await s.execute(VOLUMES_OF_VM, {"vm": vm_uuid})).all()
        disks = [await primary.disk_source(s, v, cache) for v in vols]
        nics = [_nic_spec(n) for n in (await s.execute(_NICS_OF_VM_WITH_L2, {"vm": vm_uuid})).all()]
    iso_path = await cached_image_path(platform, vm.hostUuid, vm.isoUuid) if vm.isoUuid and vm.hostUuid else None
    return VmSpec(
        uuid=vm.uuid,
        name=vm.name,
        cpu_num=vm.cpuNum,
        memory=vm.memorySize,
        disks=disks,
        nics=nics,
        iso_path=iso_path,
        boot_order=vm.bootOrder.split(","),
        console_mode=await platform.config.get("kvm", "vm.consoleMode"),
        cpu_mode=await platform.config.get("kvm", "vm.cpuMode"),
    )


async def cached_image_path(platform: Platform, host_uuid: str, image_uuid: str) -> str:
    """Make sure the host's primary storage caches the image (an ISO to boot from); return the path."""
    async with platform.db.tx() as s:
        host = await s.get(m.Host, host_uuid)
        ps = (
            await s.execute(
                select(m.PrimaryStorage)
                .join(
                    m.PrimaryStorageClusterRef, m.PrimaryStorageClusterRef.primaryStorageUuid == m.PrimaryStorage.uuid
                )
                .where(m.PrimaryStorageClusterRef.clusterUuid == host.clusterUuid)
                .limit(1)
            )
        ).scalar_one_or_none()
        if ps is None:
            raise not_allowed(f"host {host_uuid}'s cluster has no primary storage to cache image {image_uuid}")
        image = await s.get(m.Image, image_uuid)
        url = await image_source(s, image_uuid, host.zoneUuid)
    reply = await agent(
        platform,
        host_uuid,
        primary.command(ps, "cache-image"),
        {"path": ps.url, "imageUuid": image_uuid, "imageUrl": url, "md5": image.md5Sum},
    )
    return str(reply["cachePath"])
