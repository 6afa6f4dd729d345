"""The management node's periodic database backup (ZStack 1.2's "Database Periodical Backup"):
every ``database/backup.interval`` seconds a backup into ``DATA_DIR/db-backups``, of which the
newest ``database/backup.retention`` are kept. Where several nodes share one database, only the
one that joined first takes them, so that the cloud has one series of backups, not one per node;
when it stops beating, the next one takes over."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from nimbostack.core.globalconfig import GlobalConfigStore
from nimbostack.core.management import HEARTBEAT_DEAD_AFTER
from nimbostack.db import backup as dbbackup
from nimbostack.db import models as m

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

CATEGORY = "database"
INTERVAL = "backup.interval"
RETENTION = "backup.retention"


def backup_dir(p: Platform) -> Path:
    return p.settings.data_dir / dbbackup.DIR_NAME


async def takes_backups(p: Platform) -> bool:
    """Whether this node is the live one that joined first."""
    async with p.db.tx() as s:
        eldest = await s.scalar(
            select(m.ManagementNode.uuid)
            .where(m.ManagementNode.heartBeat >= datetime.utcnow() - HEARTBEAT_DEAD_AFTER)
            .order_by(m.ManagementNode.joinDate, m.ManagementNode.uuid)
            .limit(1)
        )
    return eldest is None or eldest == p.node_uuid


async def take_backup(p: Platform) -> Path:
    """One periodic backup, then the retention's pruning; the new file."""
    directory = backup_dir(p)
    path = await dbbackup.backup_async(p.settings.db_url, directory, dbbackup.PERIODIC_PREFIX, p.settings.data_dir)
    keep = p.config.cached(CATEGORY, RETENTION)
    removed = await asyncio.to_thread(dbbackup.prune, directory, keep)
    log.info("database backed up to %s%s", path, f"; removed {len(removed)} older backup(s)" if removed else "")
    return path


async def backup_loop(p: Platform) -> None:
    """The schedule runs from the newest periodic backup in the directory, so that a restarted node
    keeps the rhythm; with none yet, from the node's start."""
    wake = asyncio.Event()

    def changed(category: str, _name: str, _value: Any) -> None:
        if category == CATEGORY:  # a new interval applies now, not after the old one ran out
            wake.set()

    p.config.on_change(changed)
    started = attempted = time.time()
    while True:
        interval = p.config.cached(CATEGORY, INTERVAL)
        timeout = GlobalConfigStore.REFRESH_SECONDS  # other nodes' changes arrive by the refresh
        if interval > 0:
            found = await asyncio.to_thread(dbbackup.backups, backup_dir(p))
            anchor = max(found[-1].taken.timestamp() if found else started, attempted)
            wait = anchor + interval - time.time()
            if wait <= 0:
                attempted = time.time()  # a failed attempt is retried an interval later, not at once
                try:
                    if await takes_backups(p):
                        await take_backup(p)
                except (dbbackup.BackupError, OSError) as err:
                    log.error("periodic database backup failed: %s", err)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("periodic database backup failed")
                continue
            timeout = min(timeout, wait)
        try:
            await asyncio.wait_for(wake.wait(), timeout)
        except TimeoutError:
            pass
        wake.clear()
