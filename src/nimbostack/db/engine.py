"""Database engine: an SQLite file by default, PostgreSQL (or any SQLAlchemy async URL) by URL."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import aiosqlite
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"


def sqlite_url(data_dir: str | Path) -> str:
    return f"sqlite+aiosqlite:///{Path(data_dir).resolve() / 'nimbostack.db'}"


class _InlineQueue:
    """Stands in for aiosqlite's queue to its worker thread: runs each call at once."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Any]) -> None:
        future, function = item
        try:
            result = function()
        except BaseException as err:  # noqa: B036 - handed to the awaiting caller, as aiosqlite does
            if future is not None:
                future.set_exception(err)
        else:
            if future is not None:
                future.set_result(result)


class InlineSqliteConnection(aiosqlite.Connection):
    """aiosqlite without its worker thread: each SQLite call runs at once on the event loop.

    The node keeps a single SQLite connection, so statements are serialised anyway. Handing each one
    to a thread and back cost more than the statement (a GIL hand-off and an event-loop turn each),
    and the one connection stayed checked out across those turns, which capped the whole node at a
    few dozen transactions per second under load. A local SQLite statement takes microseconds; only
    a lock held by another process on the same file (not a supported setup: several management
    nodes share PostgreSQL) would make the loop wait, up to the busy timeout."""

    def __init__(self, connector: Any, iter_chunk_size: int = 64) -> None:
        super().__init__(connector, iter_chunk_size)
        self._tx = _InlineQueue()  # type: ignore[assignment]

    async def _execute(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._connection is None:
            raise ValueError("Connection closed")
        return fn(*args, **kwargs)

    async def _connect(self) -> InlineSqliteConnection:
        if self._connection is None:
            self._connection = self._connector()
        return self

    def __await__(self) -> Any:
        return self._connect().__await__()

    def stop(self) -> None:
        self._running = False
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            # SQLite has one writer; a single connection serialises writes without "database is
            # locked" retries, and WAL keeps commits cheap.
            self.engine: AsyncEngine = create_async_engine(
                url, pool_size=1, max_overflow=0, pool_timeout=300, async_creator=self._connect_sqlite
            )

            @event.listens_for(self.engine.sync_engine, "connect")
            def _pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()
        else:
            self.engine = create_async_engine(url, pool_size=20, max_overflow=20)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def _connect_sqlite(self) -> InlineSqliteConnection:
        cargs, cparams = self.engine.sync_engine.dialect.create_connect_args(self.engine.url)
        return await InlineSqliteConnection(partial(sqlite3.connect, *cargs, **cparams))

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[AsyncSession]:
        """One short transaction: commit on success, roll back on error. Never hold across I/O."""
        if not self.is_sqlite:
            async with self.sessions() as s, s.begin():
                yield s
            return
        # AsyncSession's own exit closes the session in a task of its own, so that a cancellation
        # cannot cut the close short; that cost a task and several event-loop turns per transaction,
        # which under load added up to seconds per API call. On the inline SQLite connection nothing
        # here suspends, so nothing can cut it short: close at once.
        s = self.sessions()
        try:
            async with s.begin():
                yield s
        finally:
            await s.close()

    async def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        await asyncio.to_thread(upgrade_schema, self.url)

    async def close(self) -> None:
        await self.engine.dispose()


def alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def upgrade_schema(url: str) -> None:
    from alembic import command

    command.upgrade(alembic_config(url), "head")
