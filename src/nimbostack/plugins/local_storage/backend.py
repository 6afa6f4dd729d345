"""LocalStorage: each host of the attached clusters keeps its share of the storage under the same
path; capacity is per host (LocalStorageHostRef) and each volume holds bytes of one host
(LocalStorageResourceRef). A volume lives on one host; LocalStorageMigrateVolume moves it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from nimbostack.db import models as m
from nimbostack.db.engine import NO_SYNC, insert_now
from nimbostack.storage.backend import PrimaryStorageBackend, agent_init

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform


# A host's share of a LocalStorage and the storage's total, taken atomically (check and take in one
# UPDATE). Built once (db/engine.py, "Statements built once"): every VM create takes. Run without
# session synchronisation: nothing reads the capacity of a storage loaded in the same session.
_FORCE_TAKE_SHARE = (
    update(m.LocalStorageHostRef)
    .where(
        m.LocalStorageHostRef.primaryStorageUuid == bindparam("ps"), m.LocalStorageHostRef.hostUuid == bindparam("host")
    )
    .values(availableCapacity=m.LocalStorageHostRef.availableCapacity - bindparam("size"))
)
_TAKE_SHARE = _FORCE_TAKE_SHARE.where(m.LocalStorageHostRef.availableCapacity >= bindparam("size"))
_TAKE_TOTAL = (
    update(m.PrimaryStorage)
    .where(m.PrimaryStorage.uuid == bindparam("ps"))
    .values(availableCapacity=m.PrimaryStorage.availableCapacity - bindparam("size"))
)


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
    async def sum_capacity(s: AsyncSession, ps_uuid: str) -> None:
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
    async def take(s: AsyncSession, ps_uuid: str, host_uuid: str, size: int, force: bool = False) -> bool:
        """Take ``size`` bytes of the host's share (``force``: even beyond what is free)."""
        params = {"ps": ps_uuid, "host": host_uuid, "size": size}
        res = await s.execute(_FORCE_TAKE_SHARE if force else _TAKE_SHARE, params, execution_options=NO_SYNC)
        if not res.rowcount:
            return False
        await s.execute(_TAKE_TOTAL, params, execution_options=NO_SYNC)
        return True

    @staticmethod
    async def give(s: AsyncSession, ps_uuid: str, host_uuid: str, size: int) -> None:
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

    async def reserve(self, s: AsyncSession, ps: m.PrimaryStorage, host_uuid: str | None, size: int,
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

    async def release(self, s: AsyncSession, resource_uuid: str) -> bool:
        ref = await s.get(m.LocalStorageResourceRef, resource_uuid)
        if ref is None:
            return False
        await self.give(s, ref.primaryStorageUuid, ref.hostUuid, ref.size)
        await s.delete(ref)
        return True


LOCAL = LocalStorageBackend()
