"""``nimbostack upgrade``: a backup, then the schema migrated to this version's newest revision.

A database a newer version wrote is refused before anything is touched (no backup is taken, no
migration runs): Alembic migrations here only go up, and the code would misread a newer schema."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from nimbostack.db import backup
from nimbostack.db.engine import NewerSchema, known_revisions, upgrade_schema

PREFIX = "nimbostack-pre-upgrade"  # a name of its own: the periodic backups' retention keeps it
# a management node beats every 5 s and the others take it for dead after 30 (core/management.py)
ALIVE = timedelta(seconds=30)


class NodeRunning(Exception):
    """A management node works on the database: migrating it under the node would have the node
    write the old schema's way into the new one."""


@dataclass(frozen=True)
class Upgraded:
    before: str | None  # None: the database was empty
    after: str
    backup: Path | None  # None: an empty database, nothing to back up


def revision(db_url: str) -> str | None:
    """The database's revision; BackupError when there is no database to upgrade or no reaching it."""
    if backup.is_sqlite(db_url):
        path = Path(make_url(db_url).database or "")
        if not path.is_file():  # sqlite3 would make an empty one where the operator mistyped
            raise backup.BackupError(f"no database at {path} (give the node's --data-dir, or --db)")
        return backup.schema_revision(db_url)
    try:
        return backup.schema_revision(db_url)
    except Exception as err:  # asyncpg's and the socket's errors have no common base but Exception
        raise backup.BackupError(f"cannot reach the database {backup.shown_url(db_url)}: {err}") from None


def check(db_url: str, force: bool = True) -> tuple[str | None, str]:
    """(the database's revision, this version's newest); NewerSchema for a downgrade, and unless
    ``force`` NodeRunning while a management node beats in it."""
    known, head = known_revisions()
    current = revision(db_url)
    if current is not None and current not in known:
        raise NewerSchema(current, head)
    nodes = running_nodes(db_url) if current is not None and not force else []
    if nodes:
        raise NodeRunning(f"a management node works on this database ({', '.join(sorted(set(nodes)))}, its last "
                          f"heartbeat less than {ALIVE.seconds} s ago): stop it first (systemctl stop "
                          "nimbostack-server), or give --force if it is dead")
    return current, head


def running_nodes(db_url: str) -> list[str]:
    """The management nodes that beat in the database lately (their hostName): none before the
    schema had the table (0007), whose nodes cannot be told from here."""

    async def read() -> list[str]:
        engine = create_async_engine(db_url)
        try:
            async with engine.connect() as conn:
                rows = (await conn.execute(text('SELECT "hostName", "heartBeat" FROM management_node'))).all()
        except DBAPIError:  # no such table
            return []
        finally:
            await engine.dispose()
        now = datetime.utcnow()
        return [str(host) for host, beat in rows if now - _when(beat) < ALIVE]

    return asyncio.run(read())


def _when(value: object) -> datetime:
    # SQLite's rows hold text, as SQLAlchemy wrote it; PostgreSQL's a timestamp
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def upgrade(db_url: str, backup_dir: Path, data_dir: Path | None = None, force: bool = False) -> Upgraded:
    """Back the database up into ``backup_dir`` (with the CA of ``data_dir``) and migrate it;
    NodeRunning, before anything is touched, while a node beats in it (unless ``force``). The backup is
    taken even when the schema is this version's already: an upgrade of the code alone is one too,
    and its new code may still change the data (as ZStack's installer does, it backs up every time)."""
    current, head = check(db_url, force)
    taken = backup.backup(db_url, backup_dir, PREFIX, data_dir=data_dir) if current is not None else None
    if current != head:
        upgrade_schema(db_url)
    return Upgraded(current, revision(db_url) or "?", taken)
