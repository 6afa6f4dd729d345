"""Primary storage backends behind one narrow interface.

The VM and volume flows ask a backend four things: hold capacity for a volume (or snapshot) that
will live on it for a given host, give it back, where the volume then lives (``placement``: a
host for storage on the host's own disks, None for storage every host reaches), and which agent
commands keep its files (``command``). Types:

* ``LocalStorage``: each host of the attached clusters keeps its share of the storage under the
  same path; capacity is per host (LocalStorageHostRef) and each volume holds bytes of one host
  (LocalStorageResourceRef). A volume lives on one host; LocalStorageMigrateVolume moves it.
* ``SharedMountPoint`` (release 1.2): a file system mounted at the same path on every host of
  the attached clusters (NFS, GlusterFS, OCFS2 ...); capacity is one pool
  (PrimaryStorageResourceRef), a volume lives on no host in particular, so a stopped VM starts
  on any host of those clusters and a running one migrates live.

Both keep qcow2 files through the agent (``/storage/local/*`` and ``/storage/smp/*``).
A new type adds a class here and registers it; the flows do not change."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, bindparam, func, select, update

from nimbostack.db import models as m
from nimbostack.db.engine import Tx, insert_now, rowcount, table_of

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform


# A host's share of a LocalStorage and the storage's total, taken atomically (check and take in one
# UPDATE). Built once (db/engine.py, "Statements built once"): every VM create takes. UPDATEs of the
# tables, which keep no loaded object in step: nothing reads the capacity of a storage loaded in the
# same transaction.
SHARE = table_of(m.LocalStorageHostRef)
STORAGE = table_of(m.PrimaryStorage)
_FORCE_TAKE_SHARE = (
    update(SHARE)
    .where(SHARE.c.primaryStorageUuid == bindparam("ps"), SHARE.c.hostUuid == bindparam("host"))
    .values(availableCapacity=SHARE.c.availableCapacity - bindparam("size"))
)
_TAKE_SHARE = _FORCE_TAKE_SHARE.where(SHARE.c.availableCapacity >= bindparam("size"))
_FORCE_TAKE_TOTAL = (
    update(STORAGE)
    .where(STORAGE.c.uuid == bindparam("ps"))
    .values(availableCapacity=STORAGE.c.availableCapacity - bindparam("size"))
)
_TAKE_TOTAL = _FORCE_TAKE_TOTAL.where(STORAGE.c.availableCapacity >= bindparam("size"))


class PrimaryStorageBackend:
    type = ""
    agent_prefix = ""
    host_bound = False  # volumes live on one host's disks

    def command(self, name: str) -> str:
        return f"{self.agent_prefix}/{name}"

    def placement(self, host_uuid: str | None) -> str | None:
        """Volume.hostUuid of a volume made through ``host_uuid``."""
        return host_uuid if self.host_bound else None

    async def init_host(self, platform: Platform, ps_uuid: str, host_uuid: str) -> None:
        """A host of an attached cluster (re)connected, or the storage was attached to its cluster."""
        raise NotImplementedError

    async def reserve(self, s: Tx, ps: m.PrimaryStorage | Row[Any], host_uuid: str | None, size: int,
                      resource_uuid: str, resource_type: str, force: bool = False) -> bool:
        """Hold ``size`` bytes for the resource (inside the caller's transaction); False when the
        storage (or the host's share of it) has not that much free. ``force``: record bytes
        already written (a snapshot's file), free or not."""
        raise NotImplementedError

    async def release(self, s: Tx, resource_uuid: str) -> bool:
        """Give back what the resource holds; False when it held nothing here."""
        raise NotImplementedError


BACKENDS: dict[str, PrimaryStorageBackend] = {}


def register(backend: PrimaryStorageBackend) -> PrimaryStorageBackend:
    BACKENDS[backend.type] = backend
    return backend


def of(ps: m.PrimaryStorage | Row[Any] | str) -> PrimaryStorageBackend:
    kind = ps if isinstance(ps, str) else ps.type
    backend = BACKENDS.get(kind)
    if backend is None:
        raise ValueError(f"no backend for primary storage type {kind}")
    return backend


async def _agent_init(platform: Platform, backend: PrimaryStorageBackend, ps_uuid: str, host_uuid: str
                      ) -> tuple[m.PrimaryStorage, dict[str, Any]]:
    async with platform.db.tx() as s:
        ps = await s.get(m.PrimaryStorage, ps_uuid)
        host = await s.get(m.Host, host_uuid)
        assert ps is not None and host is not None
        url = host.agentUrl
    reply = await platform.agents.call(url, backend.command("init"),
                                       {"hostUuid": host_uuid, "path": ps.url, "primaryStorageUuid": ps_uuid})
    return ps, reply


class LocalStorageBackend(PrimaryStorageBackend):
    type = "LocalStorage"
    agent_prefix = "/storage/local"
    host_bound = True

    async def init_host(self, platform: Platform, ps_uuid: str, host_uuid: str) -> None:
        """Ask the host for its capacity under the storage path and record its share."""
        _, reply = await _agent_init(platform, self, ps_uuid, host_uuid)
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
        await s.execute(_FORCE_TAKE_TOTAL, params)
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


class SharedMountPointBackend(PrimaryStorageBackend):
    type = "SharedMountPoint"
    agent_prefix = "/storage/smp"
    host_bound = False

    async def init_host(self, platform: Platform, ps_uuid: str, host_uuid: str) -> None:
        """The host has the file system mounted (the agent refuses otherwise); one pool."""
        _, reply = await _agent_init(platform, self, ps_uuid, host_uuid)
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
        if not rowcount(await s.execute(_FORCE_TAKE_TOTAL if force else _TAKE_TOTAL, {"ps": ps.uuid, "size": size})):
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


LOCAL = register(LocalStorageBackend())
SHARED_MOUNT_POINT = register(SharedMountPointBackend())
