"""Database engine: an SQLite file by default, PostgreSQL (or any SQLAlchemy async URL) by URL.

Statements built once: those that every VM create or start runs are module-level constants with
bind parameters (``bindparam``), not built per call. Building a statement and its cache key cost
SQLAlchemy ~100 us, about as much as running it on SQLite; a prebuilt one has its key memoised.

Reads that only read select columns, not ORM entities: the answer is ``Row``s (read-only, the same
type on every call and on both databases), and loading them skips the ORM's identity map and
object construction, which cost a third of the node's CPU per VM create when entities were read."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    CursorResult,
    Engine,
    Executable,
    Result,
    Row,
    ScalarResult,
    Select,
    Table,
    bindparam,
    create_engine,
    event,
    insert,
    inspect,
    literal,
    make_url,
    select,
)
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.types import TypeEngine

MIGRATIONS = Path(__file__).parent / "migrations"
T = TypeVar("T")
log = logging.getLogger(__name__)

Params = Mapping[str, Any] | Sequence[Mapping[str, Any]]

# PostgreSQL's SQLSTATE for "disk full" (class 53, insufficient resources)
PG_DISK_FULL = "53100"
# Below this much free space where the SQLite database lives, /health says the database fails: the
# log may grow to journal_size_limit (64 MiB) before a checkpoint rewinds it, so a filesystem with
# less than that left is a commit or two from refusing writes, though every read still works.
MIN_FREE_BYTES = 64 << 20


class StorageFull(Exception):
    """The database refused a write for want of disk space (SQLite's SQLITE_FULL, PostgreSQL's
    53100). The transaction was rolled back, and the connection is fit for the next one: the
    caller may try again once space returns."""


def disk_full(err: BaseException) -> str | None:
    """The database's own words if ``err`` (an SQLAlchemy error or what it wraps) says the disk is
    full, else None."""
    orig = getattr(err, "orig", None) or err
    if isinstance(orig, sqlite3.Error) and orig.sqlite_errorcode == sqlite3.SQLITE_FULL:
        return str(orig)
    # asyncpg's error as SQLAlchemy's adapter wraps it (sqlstate) or bare (its own attribute)
    if PG_DISK_FULL in (getattr(orig, "sqlstate", None), getattr(orig, "pgcode", None)):
        return str(orig).strip()
    return None


class Tx(Protocol):
    """One transaction of Database.tx(): an AsyncSession on PostgreSQL, an InlineSession on SQLite.
    The part of AsyncSession the node uses, so that a handler runs unchanged on both."""

    async def execute(
        self,
        statement: Executable,
        params: Params | None = None,
        *,
        execution_options: Mapping[str, Any] = ...,
        bind_arguments: dict[str, Any] | None = None,
    ) -> Result[Any]: ...

    async def scalar(self, statement: Executable, params: Params | None = None) -> Any: ...

    async def scalars(self, statement: Executable, params: Params | None = None) -> ScalarResult[Any]: ...

    async def get(self, entity: type[T], ident: Any) -> T | None: ...

    async def flush(self, objects: Sequence[Any] | None = None) -> None: ...

    async def delete(self, instance: object) -> None: ...

    def add(self, instance: object) -> None: ...


def sqlite_url(data_dir: str | Path) -> str:
    return f"sqlite+aiosqlite:///{Path(data_dir).resolve() / 'nimbostack.db'}"


# ORM UPDATEs on hot paths run in sessions that hold no object of the updated class (a new session,
# or one with only hosts and storage loaded): "evaluate" synchronisation would only scan the identity
# map for nothing, at a cost measured at ~5% of a VM create.
NO_SYNC = {"synchronize_session": False}

_NO_OPTIONS: Mapping[str, Any] = MappingProxyType({})

# AsyncSession adds these to every execute: ORM rows are read at once, not left on the cursor
_EXECUTE_OPTIONS = {"prebuffer_rows": True}


async def insert_now(s: Tx, *rows: Any) -> None:
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


def columns(model: type) -> list[Any]:
    """The model's mapped columns, to select a row of them: it reads as the object does (row.uuid,
    ...) but is read-only. Selected through the model's attributes, not its Table, so that the
    statement stays ORM-enabled: on either database a session flushes pending objects before it
    runs, as it did when the entity was selected."""
    found = _COLUMNS.get(model)
    if found is None:
        mapper: Mapper[Any] = inspect(model)
        found = _COLUMNS[model] = [getattr(model, a.key) for a in mapper.column_attrs]
    return found


def table_of(model: type) -> Table:
    """The model's Table, for statements of its columns that keep no ORM object in step (an
    UPDATE of a Table is not synchronised with a Session's objects, on either database)."""
    return cast(Table, model.__table__)  # type: ignore[attr-defined]


_COLUMNS: dict[type, list[Any]] = {}


async def get_row(s: Tx, model: type, ident: Any) -> Row[Any] | None:
    """The row of ``model`` with this primary key, as a Row of its columns (``columns``), or None:
    for a caller that only reads it (``s.get`` for one that changes it)."""
    stmt = _BY_KEY.get(model)
    if stmt is None:
        mapper: Mapper[Any] = inspect(model)
        (key,) = mapper.primary_key
        stmt = _BY_KEY[model] = select(*columns(model)).where(key == bindparam("key"))
    return (await s.execute(stmt, {"key": ident})).one_or_none()


_BY_KEY: dict[type, Select[Any]] = {}  # per model: its SELECT by primary key, built once


def in_values(column: Any, values: Iterable[Any]) -> ColumnElement[bool]:
    """``column IN (values)`` for values fixed when the statement is built, each a bound value of
    the statement's own (``IN (?, ?, ...)``). A Python list passed to ``in_`` (or a list-valued
    parameter) becomes one "expanding" parameter instead, whose SQL SQLAlchemy renders anew at
    every execution: measured 30 us on a 60 us statement."""
    return cast(ColumnElement[bool], column.in_([literal(v, column.type) for v in values]))


def rowcount(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE matched (its result is a CursorResult on either database)."""
    return cast(CursorResult[Any], result).rowcount


# What a statement is, as InlineSession routes it
_COLUMNS_OR_CORE = 0  # a SELECT of columns, a Core statement (of a Table, text): the Connection's
_ENTITIES = 1  # a SELECT whose rows hold entities, ORM objects, which only the Session makes
_ORM_DML = 2  # an UPDATE or DELETE of a mapped class: it may keep objects the Session loaded in step


def _kind(statement: Executable) -> int:
    found = _KINDS.get(statement)
    if found is None:
        if statement.is_select:
            descriptions = getattr(statement, "column_descriptions", None)
            # a compound SELECT, which does not describe its columns: the Session decides
            entities = descriptions is None or any(not isinstance(d["type"], TypeEngine) for d in descriptions)
            found = _ENTITIES if entities else _COLUMNS_OR_CORE
        elif statement.is_dml and not statement.is_insert:  # type: ignore[attr-defined]
            mapped = statement.entity_description.get("entity") is not None  # type: ignore[attr-defined]
            found = _ORM_DML if mapped else _COLUMNS_OR_CORE
        else:  # an INSERT (nothing loaded to keep in step), text, DDL
            found = _COLUMNS_OR_CORE
        _KINDS[statement] = found
    return found


# per statement, its _kind; weak: most statements are built per call. Asking the statement
# (column_descriptions, entity_description) costs 10-40 us, more than running it.
_KINDS: weakref.WeakKeyDictionary[Executable, int] = weakref.WeakKeyDictionary()


def _syncs(params: Params | None, options: Mapping[str, Any], session: Session | None) -> bool:
    """Whether an UPDATE or DELETE of a mapped class runs through the Session: to keep the objects
    this transaction loaded in step, or with many parameter sets (the ORM's UPDATE by primary key,
    which the Connection would run as an UPDATE of every row per set)."""
    if params is not None and not isinstance(params, dict | Mapping):
        return True
    return session is not None and options.get("synchronize_session") is not False and bool(session.identity_map)


class InlineSession:
    """The Tx of SQLite: the node's one SQLite connection, on the event loop.

    SQLite runs in this process and a statement takes microseconds, so the node runs it on the
    event loop. Through AsyncSession every call still paid for the async bridge: a new greenlet per
    call and two greenlet switches per DBAPI call, about as much CPU as SQLAlchemy's own work on the
    statement (half the cost of a short transaction). Here each call runs directly; the awaitable
    methods stay awaitable so the code is the same for PostgreSQL, where AsyncSession is used.

    A statement runs on the Connection unless it needs the ORM: a SELECT of entities, or an UPDATE
    or DELETE that keeps loaded objects in step with it. The ORM Session is made only when the
    transaction first needs it (an entity read, an object added): making, beginning and closing one
    cost ~100 us, and most of the node's transactions are only column reads and DML, for which
    the Session's execution costs twice the Connection's. A Session, once made, works on the same
    Connection, and its pending objects are flushed before a statement runs there, as the Session
    would itself."""

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
        statement: Executable,
        params: Params | None = None,
        *,
        execution_options: Mapping[str, Any] = _NO_OPTIONS,
        bind_arguments: dict[str, Any] | None = None,
    ) -> Result[Any]:
        session = self._session
        kind = _kind(statement)
        if kind == _ENTITIES or (kind == _ORM_DML and _syncs(params, execution_options, session)):
            options = {**_EXECUTE_OPTIONS, **execution_options} if execution_options else _EXECUTE_OPTIONS
            return self.sync_session.execute(
                statement, params, execution_options=options, bind_arguments=bind_arguments
            )
        if session is not None:
            session.flush()  # cheap when nothing is pending
        return self._db.connection().execute(statement, params, execution_options=execution_options)

    async def scalar(self, statement: Executable, params: Params | None = None) -> Any:
        return (await self.execute(statement, params)).scalar()

    async def scalars(self, statement: Executable, params: Params | None = None) -> ScalarResult[Any]:
        return (await self.execute(statement, params)).scalars()

    async def get(self, entity: type[T], ident: Any) -> T | None:
        return self.sync_session.get(entity, ident)

    async def flush(self, objects: Sequence[Any] | None = None) -> None:
        if self._session is not None:
            self._session.flush(objects)

    async def delete(self, instance: object) -> None:
        self.sync_session.delete(instance)

    def add(self, instance: object) -> None:
        self.sync_session.add(instance)

    # Two doors to the one connection: the Session and the Connection (statements that began a
    # transaction on it before the Session was made, which the Session then joined without owning
    # it). Each that began one ends it, so that the next transaction starts with none open (a
    # Session made on a Connection left "in a transaction" would join it and never commit).
    def _commit(self) -> None:
        if self._session is not None:
            self._session.commit()  # flushes
        conn = self._db.connection()
        if conn.in_transaction():
            conn.commit()

    def _rollback(self) -> None:
        """Never raises: a connection that cannot be rolled back is discarded instead, so that the
        error the caller sees is the one that failed the transaction."""
        try:
            if self._session is not None:
                self._session.rollback()
            conn = self._db.connection()
            # also a transaction whose COMMIT failed: SQLAlchemy then holds it inactive but still
            # begun, and every later statement on the connection was refused until a rollback
            conn.rollback()
            # and SQLite's own: SQLAlchemy rolls back an inactive transaction only on its side,
            # and SQLite may keep the one whose COMMIT failed open, writes and all
            if conn.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
                conn.connection.dbapi_connection.rollback()  # type: ignore[union-attr]
        except Exception:
            log.warning("SQLite rollback failed; opening a new connection", exc_info=True)
            self._db.discard_connection()

    def _wrote(self) -> bool:
        """Whether this transaction changes anything: Python's sqlite3 begins SQLite's transaction
        only before the first statement that writes, and the Session's pending objects write at
        its commit."""
        session = self._session
        if session is not None and (session.new or session.dirty or session.deleted):
            return True
        return bool(self._db.connection().connection.dbapi_connection.in_transaction)  # type: ignore[union-attr]

    def _close(self) -> None:
        if self._session is not None:
            try:
                self._session.close()
            except Exception:  # its connection is discarded already, or is now
                log.warning("SQLite session close failed; opening a new connection", exc_info=True)
                self._db.discard_connection()
            self._session = None


_PROBE = select(literal(1))

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

            # PostgreSQL refuses a write as it runs (a table that cannot grow), not at COMMIT:
            # a write statement that runs after a refusal says the space is back
            @event.listens_for(self.engine.sync_engine, "after_cursor_execute")
            def _wrote(_conn, _cursor, _statement, _params, context, _many) -> None:  # type: ignore[no-untyped-def]
                if self.storage_full is not None and (context.isinsert or context.isupdate or context.isdelete):
                    self.storage_full = None

        # the database's words for the last write refused for want of space, until one gets through
        self.storage_full: str | None = None

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[Tx]:
        """One short transaction: commit on success, roll back on error. Never hold across I/O.
        A write refused for want of disk space raises StorageFull, whatever statement met it."""
        if not self.is_sqlite:
            try:
                async with self.sessions() as s, s.begin():
                    yield s
            except Exception as err:
                self._full(err)
                raise
            return
        if self._turn.locked():  # only when a transaction awaits while open; as the pool's timeout was
            async with asyncio.timeout(300):
                await self._turn.acquire()
        else:
            await self._turn.acquire()
        inline = InlineSession(self)
        try:
            yield inline
            wrote = self.storage_full is not None and inline._wrote()
            inline._commit()
            if wrote:  # space is back: the first write since the failure got through
                self.storage_full = None
        except BaseException as err:
            inline._rollback()
            if isinstance(err, Exception):
                self._full(err)
            raise
        finally:
            inline._close()
            self._turn.release()

    def _full(self, err: Exception) -> None:
        """Raise StorageFull for a disk-full error, and remember it for /health: reads still work
        while the disk is full, so only a write tells, and the next write that gets through says
        that it is over."""
        said = disk_full(err)
        if said is not None:
            self.storage_full = said
            log.warning("the database refused a write: %s", said)
            raise StorageFull(said) from err

    def discard_connection(self) -> None:
        """SQLite: drop the node's connection after it failed in a way a rollback may not repair
        (a failed COMMIT or ROLLBACK); closing it rolls back whatever SQLite still held open, and
        the next transaction opens a new one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception:
                log.warning("closing the broken SQLite connection failed", exc_info=True)

    async def check(self, timeout: float = 5.0) -> str | None:
        """What is wrong with the database, for /health, or None. Cheap enough to poll: a trivial
        SELECT (the database answers), a statvfs of the SQLite database's filesystem (reads work
        on a full disk, writes do not) and the last write's outcome (the only sign of a full disk
        on PostgreSQL's server, which the node cannot look at)."""
        try:
            async with asyncio.timeout(timeout):
                async with self.tx() as s:
                    await s.execute(_PROBE)
        except TimeoutError:
            return f"no answer to a SELECT within {timeout:g} s"
        except Exception as err:
            return f"a SELECT failed: {type(err).__name__}: {err}"
        if self.storage_full is not None:
            return f"storage full: the last write was refused ({self.storage_full})"
        if self.is_sqlite:
            where = os.path.dirname(self.sync_engine.url.database or ".")
            st = os.statvfs(where)
            free = st.f_bavail * st.f_frsize
            if free < MIN_FREE_BYTES:
                return f"storage full: {free} bytes free on the filesystem of {where} (needs {MIN_FREE_BYTES})"
        return None

    def connection(self) -> Connection:
        """SQLite: the node's one connection, checked out of the pool for as long as the node runs
        (every transaction used it anyway; checking it out and back in cost ~30 us each time)."""
        if self._conn is None:
            self._conn = self.sync_engine.connect()
        return self._conn

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


class NewerSchema(Exception):
    """The database is at a revision this version's migrations do not know: a newer nimbostack
    wrote it. Nothing was changed; there is no migrating down."""

    def __init__(self, revision: str, head: str) -> None:
        super().__init__(f"the database is at schema revision {revision}, newer than this nimbostack knows "
                         f"(its newest is {head}): a newer version wrote it. Run that version, or restore a "
                         "backup taken before its upgrade (nimbostack db restore)")
        self.revision, self.head = revision, head


def known_revisions() -> tuple[set[str], str]:
    """The schema revisions of this version's migrations, and the newest of them."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return {s.revision for s in script.walk_revisions()}, str(script.get_current_head())


def upgrade_schema(url: str) -> None:
    """Bring the schema to this version's newest revision; NewerSchema, before any change, for a
    database a newer version wrote (migrations/env.py checks it inside the migration's transaction)."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")
