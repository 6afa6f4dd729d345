"""Database engine: an SQLite file by default, PostgreSQL (or any SQLAlchemy async URL) by URL.

Statements built once: those that every VM create or start runs are module-level constants with
bind parameters (``bindparam``), not built per call. Building a statement and its cache key cost
SQLAlchemy ~100 us, about as much as running it on SQLite; a prebuilt one has its key memoised."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import (
    Connection,
    Engine,
    Result,
    bindparam,
    create_engine,
    event,
    insert,
    inspect,
    make_url,
    select,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

from nimbostack.db import fastsql

MIGRATIONS = Path(__file__).parent / "migrations"
S = TypeVar("S")
log = logging.getLogger(__name__)


def sqlite_url(data_dir: str | Path) -> str:
    return f"sqlite+aiosqlite:///{Path(data_dir).resolve() / 'nimbostack.db'}"


# ORM UPDATEs on hot paths run in sessions that hold no object of the updated class (a new session,
# or one with only hosts and storage loaded): "evaluate" synchronisation would only scan the identity
# map for nothing, at a cost measured at ~5% of a VM create.
NO_SYNC = {"synchronize_session": False}

# AsyncSession adds these to every execute: ORM rows are read at once, not left on the cursor
_EXECUTE_OPTIONS = {"prebuffer_rows": True}


async def insert_now(s: Any, *rows: Any) -> None:
    """INSERT new rows (ORM objects used as records) by statement, at once, in this order, rather
    than ``s.add`` and the unit of work's flush: a flush cost ~0.3 ms plus ~0.1 ms a row, the
    statements ~0.04 ms a row, and a VM create makes a dozen rows. The objects stay transient;
    what the database fills in (defaults) is read back from the database, not from them."""
    for row in rows:
        model = type(row)
        found = _INSERTS.get(model)
        if found is None:
            found = _INSERTS[model] = (insert(model), [a.key for a in inspect(model).column_attrs])
        stmt, keys = found
        await s.execute(stmt, {k: v for k in keys if (v := row.__dict__.get(k)) is not None})


_INSERTS: dict[type, tuple[Any, list[str]]] = {}  # per model: its INSERT, built once, and its columns


def records(stmt: S) -> S:
    """The statement, with its ORM entities read as records where it can (db/fastsql.py): for a
    caller that only reads what it selects. On SQLite that skips the ORM's loading; elsewhere the
    rows are ORM objects, which read the same."""
    return stmt.execution_options(**{fastsql.RECORDS: True})  # type: ignore[attr-defined,no-any-return]


async def get_record(s: Any, model: type, ident: Any) -> Any:
    """``s.get(model, ident)`` for a caller that only reads the row (see ``records``); None if
    there is no such row."""
    stmt = _BY_KEY.get(model)
    if stmt is None:
        (key,) = inspect(model).primary_key
        stmt = _BY_KEY[model] = records(select(model).where(key == bindparam("key")))
    return (await s.execute(stmt, {"key": ident})).scalar_one_or_none()


_BY_KEY: dict[type, Any] = {}  # per model: its SELECT by primary key, built once


class InlineSession:
    """The part of AsyncSession the node uses (execute, get, flush, add, delete, scalar(s)), on the
    node's one SQLite connection.

    SQLite runs in this process and a statement takes microseconds, so the node runs it on the
    event loop. Through AsyncSession every call still paid for the async bridge: a new greenlet per
    call and two greenlet switches per DBAPI call, about as much CPU as SQLAlchemy's own work on the
    statement (half the cost of a short transaction). Here each call runs directly; the awaitable
    methods stay awaitable so the code is the same for PostgreSQL, where AsyncSession is used.

    The ORM Session is made only when the transaction first needs it (an entity read, an object
    added): making, beginning and closing one cost ~100 us, and most of the node's transactions
    are only Core statements, which fastsql runs on the DBAPI connection. Such a transaction is
    committed on that connection; one with a Session through it (the same connection)."""

    __slots__ = ("_db", "_session")

    def __init__(self, db: Database) -> None:
        self._db = db
        self._session: Session | None = None

    @property
    def sync_session(self) -> Session:
        if self._session is None:
            self._session = Session(bind=self._db.connection(), expire_on_commit=False)
        return self._session

    async def execute(
        self,
        statement: Any,
        params: Any = None,
        *,
        execution_options: Mapping[str, Any] | None = None,
        bind_arguments: dict[str, Any] | None = None,
    ) -> Result[Any]:
        db = self._db
        fast = fastsql.execute(db.dbapi(), db.sync_engine.dialect, self._session, statement, params, execution_options)
        if fast is not None:
            return cast(Result[Any], fast)
        if statement.is_dml and (
            statement.is_insert or (execution_options and execution_options.get("synchronize_session") is False)
        ):
            # an INSERT, or an UPDATE/DELETE with no loaded object to keep in step: the statement as
            # Core on the session's connection (a third of the ORM's cost), after the flush the ORM
            # would have done first
            if self._session is not None:
                self._session.flush()
            return db.connection().execute(statement, params)
        options = {**_EXECUTE_OPTIONS, **execution_options} if execution_options else _EXECUTE_OPTIONS
        return self.sync_session.execute(statement, params, execution_options=options, bind_arguments=bind_arguments)

    async def scalar(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return (await self.execute(statement, params, **kw)).scalar()

    async def scalars(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return (await self.execute(statement, params, **kw)).scalars()

    async def get(self, entity: Any, ident: Any, **kw: Any) -> Any:
        return self.sync_session.get(entity, ident, **kw)

    async def flush(self, objects: Any = None) -> None:
        if self._session is not None:
            self._session.flush(objects)

    async def refresh(self, instance: object, attribute_names: Any = None) -> None:
        self.sync_session.refresh(instance, attribute_names)

    async def delete(self, instance: object) -> None:
        self.sync_session.delete(instance)

    def add(self, instance: object) -> None:
        self.sync_session.add(instance)

    def add_all(self, instances: Any) -> None:
        self.sync_session.add_all(instances)

    # The transaction may have run through three doors to the one sqlite3 connection: the Session,
    # SQLAlchemy's Connection (Core statements, which begin a transaction of its own on it), and
    # fastsql on the DBAPI connection, which SQLAlchemy does not see. Each that began one ends it,
    # so that the next transaction starts with none open anywhere (a Session made on a Connection
    # left "in a transaction" would join it and never commit).
    def _commit(self) -> None:
        if self._session is not None:
            self._session.commit()  # flushes
        conn = self._db.connection()
        if conn.in_transaction():
            conn.commit()
        dbapi = self._db.dbapi()
        if dbapi.in_transaction:  # only fastsql's statements wrote
            dbapi.commit()

    def _rollback(self) -> None:
        if self._session is not None:
            self._session.rollback()
        conn = self._db.connection()
        if conn.in_transaction():
            conn.rollback()
        dbapi = self._db.dbapi()
        if dbapi.in_transaction:
            dbapi.rollback()

    def _close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


# 40 MB of 4 KiB pages: a few seconds of a busy node's writes
WAL_RESTART_FRAMES = 10_000


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            # SQLite has one writer; a single connection serialises writes without "database is
            # locked" retries, and WAL keeps commits cheap. The node's transactions take turns on
            # it through an asyncio lock (FIFO), so a transaction that awaits something while open
            # makes the others wait without blocking the event loop.
            self.sync_engine: Engine = create_engine(
                make_url(url).set(drivername="sqlite"), pool_size=1, max_overflow=0, pool_timeout=300
            )
            self._turn = asyncio.Lock()

            @event.listens_for(self.sync_engine, "connect")
            def _pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=30000")
                # SQLite's own page cache is 2 MiB by default: with thousands of VMs most reads
                # missed it and became system calls. The database lives as long as the node, so
                # keep far more of it in memory, and read the rest through a memory map.
                cur.execute("PRAGMA cache_size=-65536")
                cur.execute("PRAGMA mmap_size=268435456")
                # No checkpoints on this connection: SQLite runs them inside a commit, which then
                # waits for the database file's fsync, and this connection works on the event loop.
                # checkpoint_loop does them from a thread instead.
                cur.execute("PRAGMA wal_autocheckpoint=0")
                # and a rewound log gives its disk space back
                cur.execute("PRAGMA journal_size_limit=67108864")
                cur.close()

            self._conn: Connection | None = None
        else:
            self.engine: AsyncEngine = create_async_engine(url, pool_size=20, max_overflow=20)
            self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[AsyncSession]:
        """One short transaction: commit on success, roll back on error. Never hold across I/O."""
        if not self.is_sqlite:
            async with self.sessions() as s, s.begin():
                yield s
            return
        if self._turn.locked():  # only when a transaction awaits while open; as the pool's timeout was
            async with asyncio.timeout(300):
                await self._turn.acquire()
        else:
            await self._turn.acquire()
        s = InlineSession(self)
        try:
            # the subset of AsyncSession the handlers use: same code for PostgreSQL
            yield cast(AsyncSession, s)
            s._commit()
        except BaseException:
            s._rollback()
            raise
        finally:
            s._close()
            self._turn.release()

    def connection(self) -> Connection:
        """SQLite: the node's one connection, checked out of the pool for as long as the node runs
        (every transaction used it anyway; checking it out and back in cost ~30 us each time)."""
        if self._conn is None:
            self._conn = self.sync_engine.connect()
        return self._conn

    def dbapi(self) -> sqlite3.Connection:
        return cast(sqlite3.Connection, self.connection().connection.dbapi_connection)

    async def checkpoint_loop(self, every: float = 1.0, restart_at: int = WAL_RESTART_FRAMES) -> None:
        """SQLite only: copy the write-ahead log into the database file every ``every`` seconds,
        on a connection of its own in a worker thread. PASSIVE never waits for (nor blocks) the
        node's connection. Done inside commits on the event loop (SQLite's default), an fsync
        slowed by other disk traffic stalled every API call and host ping for seconds.

        Under a steady stream of transactions that alone lets the log grow without end: SQLite
        starts it afresh only when a transaction begins with every frame already copied back,
        and new frames always arrive while a checkpoint runs. A long log costs every page read
        (its index is searched segment by segment) and disk space. So once it holds
        ``restart_at`` frames, a second pass copies the few frames written during the first
        while the node's transactions wait their turn; the next transaction rewinds the log."""
        if not self.is_sqlite:
            return
        path = self.sync_engine.url.database
        # one thread of its own: a checkpoint still running when the loop is cancelled is done
        # before the connection closes
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-checkpoint")
        conn: sqlite3.Connection | None = None

        def checkpoint() -> int:
            """Frames in the log (all of them copied back unless a reader held some)."""
            nonlocal conn
            if conn is None:
                conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                conn.execute("PRAGMA busy_timeout=30000")
            _busy, frames, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return int(frames)

        def close() -> None:
            if conn is not None:
                conn.close()

        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(every)
                try:
                    frames = await loop.run_in_executor(worker, checkpoint)
                    if frames >= restart_at:
                        began = loop.time()
                        async with self._turn:
                            await loop.run_in_executor(worker, checkpoint)
                        held = loop.time() - began
                        log.log(
                            logging.WARNING if held > 1.0 else logging.DEBUG,
                            "SQLite log of %d frames rewound; transactions waited %.0f ms",
                            frames,
                            held * 1000,
                        )
                except sqlite3.Error as err:  # the next round tries again; the log only grows meanwhile
                    log.warning("SQLite checkpoint failed: %s", err)
        finally:
            worker.submit(close)
            worker.shutdown(wait=False)

    async def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        await asyncio.to_thread(upgrade_schema, self.url)

    async def close(self) -> None:
        if self.is_sqlite:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self.sync_engine.dispose()
        else:
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
