"""SharedMountPoint (release 1.2): a file system mounted at the same path on every host of the
attached clusters (NFS, GlusterFS, OCFS2 ...); capacity is one pool (PrimaryStorageResourceRef), a
volume lives on no host in particular, so a stopped VM starts on any host of those clusters and a
running one migrates live."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, func, select, update

from nimbostack.db import models as m
from nimbostack.db.engine import Tx, insert_now, rowcount
from nimbostack.storage.backend import FORCE_TAKE_TOTAL, TAKE_TOTAL, PrimaryStorageBackend, agent_init

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform


class SharedMountPointBackend(PrimaryStorageBackend):
    type = "SharedMountPoint"
    agent_prefix = "/storage/smp"
    host_bound = False

    async def init_host(self, platform: Platform, ps_uuid: str, host_uuid: str) -> None:
        """The host has the file system mounted (the agent refuses otherwise); one pool."""
        reply = await agent_init(platform, self, ps_uuid, host_uuid)
        async with platform.db.tx() as s:
            ps = await s.get(m.PrimaryStorage, ps_uuid)
            used = (
                await s.execute(
                    select(func.coalesce(func.sum(m.PrimaryStorageResourceRef.size), 0)).where(
                        m.PrimaryStorageResourceRef.primaryStorageUuid == ps_uuid
                    )
                )
            ).scalar_one()
            ps.totalCapacity = ps.totalPhysicalCapacity = reply["totalCapacity"]
            ps.availablePhysicalCapacity = reply["availableCapacity"]
            ps.availableCapacity = ps.totalCapacity - int(used)

    async def reserve(self, s: Tx, ps: m.PrimaryStorage | Row[Any], host_uuid: str | None, size: int,
                      resource_uuid: str, resource_type: str, force: bool = False) -> bool:
        if not rowcount(await s.execute(FORCE_TAKE_TOTAL if force else TAKE_TOTAL, {"ps": ps.uuid, "size": size})):
            return False
        await insert_now(s, m.PrimaryStorageResourceRef(resourceUuid=resource_uuid, primaryStorageUuid=ps.uuid,
                                                        size=size, resourceType=resource_type))
        return True

    async def release(self, s: Tx, resource_uuid: str) -> bool:
        ref = await s.get(m.PrimaryStorageResourceRef, resource_uuid)
        if ref is None:
            return False
        await s.execute(
            update(m.PrimaryStorage)
            .where(m.PrimaryStorage.uuid == ref.primaryStorageUuid)
            .values(availableCapacity=m.PrimaryStorage.availableCapacity + ref.size)
        )
        await s.delete(ref)
        return True


SHARED_MOUNT_POINT = SharedMountPointBackend()
