"""Primary storage backends behind one narrow interface, and their registry.

The VM and volume flows ask a backend: hold capacity for a volume (or snapshot) that will live on
it for a given host, give it back, where the volume then lives (``placement``: a host for storage
on the host's own disks, None for storage every host reaches), where a new volume's file goes
(``install_path``), how a hypervisor reaches it (``disk_source``), and which agent commands keep
its files (``command``). Each type is a plugin (``nimbostack/plugins/local_storage``,
``plugins/shared_mount_point``) that registers its backend; the flows do not change."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, bindparam, select, update

from nimbostack.db import models as m
from nimbostack.db.engine import Tx, table_of
from nimbostack.wire import DiskSpec

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform


# A storage's total, taken atomically (check and take in one UPDATE). Built once (db/engine.py,
# "Statements built once"): every VM create takes. UPDATEs of the table, which keep no loaded object
# in step: nothing reads the capacity of a storage loaded in the same transaction.
STORAGE = table_of(m.PrimaryStorage)
HOST = table_of(m.Host)
FORCE_TAKE_TOTAL = (
    update(STORAGE)
    .where(STORAGE.c.uuid == bindparam("ps"))
    .values(availableCapacity=STORAGE.c.availableCapacity - bindparam("size"))
)
TAKE_TOTAL = FORCE_TAKE_TOTAL.where(STORAGE.c.availableCapacity >= bindparam("size"))


class PrimaryStorageBackend:
    type = ""
    agent_prefix = ""
    host_bound = False  # volumes live on one host's disks

    def command(self, name: str) -> str:
        return f"{self.agent_prefix}/{name}"

    def install_path(
        self, ps: m.PrimaryStorage | Row[Any], account_uuid: str, volume_uuid: str, volume_type: str
    ) -> str:
        """Where a new volume's file goes: below the storage's url, one folder per account and volume."""
        folder = "rootVolumes" if volume_type == "Root" else "dataVolumes"
        return f"{ps.url}/{folder}/acct-{account_uuid}/vol-{volume_uuid}/{volume_uuid}.qcow2"

    def disk_source(self, volume_uuid: str, install_path: str, device_id: int, fmt: str, cache: str) -> DiskSpec:
        """How the hypervisor opens the volume: a file at its install path (storage kept as files)."""
        return DiskSpec(volume_uuid, install_path, device_id, fmt, cache)

    def placement(self, host_uuid: str | None) -> str | None:
        """Volume.hostUuid of a volume made through ``host_uuid``."""
        return host_uuid if self.host_bound else None

    async def init_host(self, platform: Platform, ps_uuid: str, host_uuid: str) -> None:
        """A host of an attached cluster (re)connected, or the storage was attached to its cluster."""
        raise NotImplementedError

    async def drop_host(self, s: Tx, host_uuid: str) -> None:
        """A host is deleted (inside the caller's transaction): what the storage counts of it goes.
        Nothing for storage every host shares."""

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


def unregister(kind: str) -> None:
    BACKENDS.pop(kind, None)


def of(ps: m.PrimaryStorage | Row[Any] | str) -> PrimaryStorageBackend:
    kind = ps if isinstance(ps, str) else ps.type
    backend = BACKENDS.get(kind)
    if backend is None:
        raise ValueError(f"no backend for primary storage type {kind}")
    return backend


# what an init reads: two columns, not two whole rows (a restart inits every host's share)
_INIT_TARGET = select(
    select(STORAGE.c.url).where(STORAGE.c.uuid == bindparam("ps")).scalar_subquery(),
    select(HOST.c.agentUrl).where(HOST.c.uuid == bindparam("host")).scalar_subquery(),
)


async def agent_init(platform: Platform, backend: PrimaryStorageBackend, ps_uuid: str, host_uuid: str
                      ) -> dict[str, Any]:
    """The host's answer to the storage's ``init`` command (its capacity under the storage's url)."""
    async with platform.db.tx() as s:
        path, url = (await s.execute(_INIT_TARGET, {"ps": ps_uuid, "host": host_uuid})).one()
    return await platform.agents.call(url, backend.command("init"),
                                      {"hostUuid": host_uuid, "path": path, "primaryStorageUuid": ps_uuid})
