"""LocalStorage: each host of the attached clusters keeps its share of the storage under the same
path; capacity is per host (LocalStorageHostRef) and each volume holds bytes of one host
(LocalStorageResourceRef). A volume lives on one host; LocalStorageMigrateVolume moves it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, bindparam, func, select, update

from nimbostack.db import models as m
from nimbostack.db.engine import Tx, insert_now, rowcount, table_of
from nimbostack.storage.backend import FORCE_TAKE_TOTAL, STORAGE, PrimaryStorageBackend, agent_init

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


# the four figures a share adds to its storage's, in this order
_TOTALS = ("totalCapacity", "availableCapacity", "totalPhysicalCapacity", "availablePhysicalCapacity")
_ADD_TO_TOTALS = (
    update(STORAGE)
    .where(STORAGE.c.uuid == bindparam("ps"))
    .values({name: STORAGE.c[name] + bindparam(f"d_{name}") for name in _TOTALS})
)


def _figures(ref: m.LocalStorageHostRef) -> list[int]:
    return [int(getattr(ref, name) or 0) for name in _TOTALS]


class LocalStorageBackend(PrimaryStorageBackend):
    type = "LocalStorage"
    agent_prefix = "/storage/local"
    host_bound = True

    async def init_host(self, platform: Platform, ps_uuid: str, host_uuid: str) -> None:
        """Ask the host for its capacity under the storage path and record its share; the
        storage's totals move by what this share changed (not a sum over every host's share: a
        connect costs the same with 25,000 hosts as with one)."""
        reply = await agent_init(platform, self, ps_uuid, host_uuid)
        async with platform.db.tx() as s:
            ref = (
                await s.execute(
                    select(m.LocalStorageHostRef)
                    .where(
                        m.LocalStorageHostRef.primaryStorageUuid == ps_uuid,
                        m.LocalStorageHostRef.hostUuid == host_uuid,
                    )
                    .with_for_update()  # PostgreSQL: no take may slip between reading it and the totals
                )
            ).scalar_one_or_none()
            if ref is None:
                ref = m.LocalStorageHostRef(primaryStorageUuid=ps_uuid, hostUuid=host_uuid)
                s.add(ref)
            before = _figures(ref)
            used = (
                await s.execute(
                    select(func.coalesce(func.sum(m.LocalStorageResourceRef.size), 0)).where(
                        m.LocalStorageResourceRef.primaryStorageUuid == ps_uuid,
                        m.LocalStorageResourceRef.hostUuid == host_uuid,
                    )
                )
            ).scalar_one()
            ref.totalCapacity = ref.totalPhysicalCapacity = reply["totalCapacity"]
            ref.availablePhysicalCapacity = reply["availableCapacity"]
            ref.availableCapacity = ref.totalCapacity - int(used)
            await self.add_to_totals(s, ps_uuid, [a - b for a, b in zip(_figures(ref), before, strict=True)])

    @staticmethod
    async def add_to_totals(s: Tx, ps_uuid: str, delta: list[int]) -> None:
        """Move the storage's four figures by a host share's change (or, negated, its removal)."""
        if any(delta):
            params = {f"d_{name}": d for name, d in zip(_TOTALS, delta, strict=True)}
            await s.execute(_ADD_TO_TOTALS, {"ps": ps_uuid, **params})

    async def drop_host(self, s: Tx, host_uuid: str) -> None:
        """The host leaves: its shares leave the storages' totals (the rows go with the host)."""
        refs = (
            await s.execute(select(m.LocalStorageHostRef).where(m.LocalStorageHostRef.hostUuid == host_uuid))
        ).scalars().all()
        for ref in refs:
            await self.add_to_totals(s, ref.primaryStorageUuid, [-v for v in _figures(ref)])

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
