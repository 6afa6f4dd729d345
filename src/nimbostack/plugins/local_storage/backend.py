"""LocalStorage: each host of the attached clusters keeps its share of the storage under the same
path; capacity is per host (LocalStorageHostRef) and each volume holds bytes of one host
(LocalStorageResourceRef). A volume lives on one host; LocalStorageMigrateVolume moves it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, bindparam, func, select, update

from nimbostack.db import models as m
from nimbostack.db.engine import Tx, insert_now, rowcount, table_of
from nimbostack.storage.backend import FORCE_TAKE_TOTAL, PrimaryStorageBackend, agent_init

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform


# A host's share of a LocalStorage, taken atomically (check and take in one UPDATE), with the
# storage's total (storage/backend.py). Built once: every VM create takes.
SHARE = table_of(m.LocalStorageHostRef)
_FORCE_TAKE_SHARE = (
    update(SHARE)
    .where(SHARE.c.primaryStorageUuid == bindparam("ps"), SHARE.c.hostUuid == bindparam("host"))
    .values(availableCapacity=SHARE.c.availableCapacity - bindparam("size"))
)
_TAKE_SHARE = _FORCE_TAKE_SHARE.where(SHARE.c.availableCapacity >= bindparam("size"))


class LocalStorageBackend(PrimaryStorageBackend):
    type = "LocalStorage"
    agent_prefix = "/storage/local"
    host_bound = True

    async def init_host(self, platform: Platform, ps_uuid: str, host_uuid: str) -> None:
        """Ask the host for its capacity under the storage path and record its share."""
        _, reply = await agent_init(platform, self, ps_uuid, host_uuid)
        async with platform.db.tx() as s:
            ref = (
                await s.execute(
                    select(m.LocalStorageHostRef).where(
                        m.LocalStorageHostRef.primaryStorageUuid == ps_uuid,
                        m.LocalStorageHostRef.hostUuid == host_uuid,
                    )
                )
            ).scalar_one_or_none()
            if ref is None:
                ref = m.LocalStorageHostRef(primaryStorageUuid=ps_uuid, hostUuid=host_uuid)
                s.add(ref)
            ref.totalCapacity = ref.totalPhysicalCapacity = reply["totalCapacity"]
            ref.availablePhysicalCapacity = reply["availableCapacity"]
            used = (
                await s.execute(
                    select(func.coalesce(func.sum(m.LocalStorageResourceRef.size), 0)).where(
                        m.LocalStorageResourceRef.primaryStorageUuid == ps_uuid,
                        m.LocalStorageResourceRef.hostUuid == host_uuid,
                    )
                )
            ).scalar_one()
            ref.availableCapacity = ref.totalCapacity - int(used)
            await s.flush()
            await self.sum_capacity(s, ps_uuid)

    @staticmethod
    async def sum_capacity(s: Tx, ps_uuid: str) -> None:
        total, avail, ptotal, pavail = (
            await s.execute(
                select(
                    func.coalesce(func.sum(m.LocalStorageHostRef.totalCapacity), 0),
                    func.coalesce(func.sum(m.LocalStorageHostRef.availableCapacity), 0),
                    func.coalesce(func.sum(m.LocalStorageHostRef.totalPhysicalCapacity), 0),
                    func.coalesce(func.sum(m.LocalStorageHostRef.availablePhysicalCapacity), 0),
                ).where(m.LocalStorageHostRef.primaryStorageUuid == ps_uuid)
            )
        ).one()
        await s.execute(
            update(m.PrimaryStorage)
            .where(m.PrimaryStorage.uuid == ps_uuid)
            .values(
                totalCapacity=total,
                availableCapacity=avail,
                totalPhysicalCapacity=ptotal,
                availablePhysicalCapacity=pavail,
            )
        )

    @staticmethod
    async def take(s: Tx, ps_uuid: str, host_uuid: str, size: int, force: bool = False) -> bool:
        """Take ``size`` bytes of the host's share (``force``: even beyond what is free)."""
        params = {"ps": ps_uuid, "host": host_uuid, "size": size}
        if not rowcount(await s.execute(_FORCE_TAKE_SHARE if force else _TAKE_SHARE, params)):
            return False
        await s.execute(FORCE_TAKE_TOTAL, params)
        return True

    @staticmethod
    async def give(s: Tx, ps_uuid: str, host_uuid: str, size: int) -> None:
        await s.execute(
            update(m.LocalStorageHostRef)
            .where(m.LocalStorageHostRef.primaryStorageUuid == ps_uuid, m.LocalStorageHostRef.hostUuid == host_uuid)
            .values(availableCapacity=m.LocalStorageHostRef.availableCapacity + size)
        )
        await s.execute(
            update(m.PrimaryStorage)
            .where(m.PrimaryStorage.uuid == ps_uuid)
            .values(availableCapacity=m.PrimaryStorage.availableCapacity + size)
        )

    async def reserve(self, s: Tx, ps: m.PrimaryStorage | Row[Any], host_uuid: str | None, size: int,
                      resource_uuid: str, resource_type: str, force: bool = False) -> bool:
        if not host_uuid or not await self.take(s, ps.uuid, host_uuid, size, force):
            return False
        await insert_now(
            s,
            m.LocalStorageResourceRef(
                resourceUuid=resource_uuid,
                primaryStorageUuid=ps.uuid,
                hostUuid=host_uuid,
                size=size,
                resourceType=resource_type,
            ),
        )
        return True

    async def release(self, s: Tx, resource_uuid: str) -> bool:
        ref = await s.get(m.LocalStorageResourceRef, resource_uuid)
        if ref is None:
            return False
        await self.give(s, ref.primaryStorageUuid, ref.hostUuid, ref.size)
        await s.delete(ref)
        return True


LOCAL = LocalStorageBackend()
