"""The management node's start-up and shutdown: the platform, its background loops, the heap freeze."""

from __future__ import annotations

import asyncio
import gc as pygc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from nimbostack.compute import host as hostmod
from nimbostack.compute import recovery
from nimbostack.core import dbbackup, expunger, gc, management
from nimbostack.core.platform import Platform, Settings
from nimbostack.network.l2l3 import seed_providers

log = logging.getLogger(__name__)


async def start_platform(settings: Settings) -> tuple[Platform, recovery.Reconnect]:
    """The platform on a migrated, seeded database, with the jobs a dead node left answered; and
    its hosts to reconnect, which ``start_loops`` does in the background: the node serves first,
    however many hosts it has."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    p = Platform(settings)
    await p.db.migrate()
    await p.config.seed()
    await p.auth.seed_admin()
    await seed_providers(p.db)
    reconnect = await recovery.recover(p)
    await management.join(p)
    return p, reconnect


def start_loops(p: Platform, reconnect: recovery.Reconnect | None = None) -> list[asyncio.Task[None]]:
    loops = (
        [hostmod.ping_loop(p), expunger.expunge_loop(p), gc.gc_loop(p), dbbackup.backup_loop(p)]
        if p.settings.background
        else []
    )
    if reconnect is not None:
        loops.append(reconnect.run(p))  # always: a host left Connecting would never be pinged again
    loops.append(p.config.refresh_loop())  # always: other nodes' config changes must arrive
    loops.append(management.heartbeat_loop(p))  # always: the others take a silent node for dead
    loops.append(p.db.checkpoint_loop())  # always: SQLite's log is written back only there
    return [asyncio.create_task(loop) for loop in loops]


def freeze_heap() -> None:
    # Everything alive now (modules, the API table, SQLAlchemy's mappers and caches) lives as
    # long as the node: keep it out of the collector's scans. And let the young generation
    # grow bigger before a collection: an API call makes thousands of short-lived ORM objects,
    # and the default threshold (700) ran a collection every few statements.
    pygc.collect()
    pygc.freeze()
    pygc.set_threshold(50_000, 20, 20)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Platform]:
    """A started node for the life of the block; on leaving it, the loops stop and the platform closes."""
    p, reconnect = await start_platform(settings)
    tasks = start_loops(p, reconnect)
    freeze_heap()
    log.info("management node ready on port %s (database %s)", settings.port, settings.db_url.split("://")[0])
    try:
        yield p
    finally:
        for t in tasks:
            t.cancel()
        try:
            await management.leave(p)
        finally:
            await p.close()
