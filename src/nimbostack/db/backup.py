"""Backups of the node's database while it runs, and their restore into a fresh data dir or an
empty database: SQLite through its online backup API, PostgreSQL through pg_dump's custom format.

A backup is one file, ``<prefix>-<UTC time>.db`` (SQLite) or ``.dump`` (pg_dump -Fc), written 0600
as ``<name>.part`` and renamed when whole, so that a file with a backup's name is always a whole
backup. The directory is 0700: a backup holds every account's password hash.

The node's CA (``DATA_DIR/pki``) is the one piece of the cloud outside the database: every host
agent trusts only it. So a backup directory also keeps a copy of it (``pki/``), and a restore takes
it along into the new data dir; else the restored node would make a CA of its own, and no host
would answer it until each got new credentials."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sqlite3
import stat
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from alembic.util.exc import CommandError
from sqlalchemy import URL, make_url

from nimbostack.db.engine import upgrade_schema
from nimbostack.wire.pki import write_private

PREFIX = "nimbostack"
# what the management node's own backups are called: only these does its retention remove, never a
# backup an operator took by hand
PERIODIC_PREFIX = "nimbostack-periodic"
# below the data dir, where the management node's periodic backups go (and `db backup` by default)
DIR_NAME = "db-backups"

PKI_DIR = "pki"
CA_FILES = ("ca.key", "ca.crt")
SQLITE_MAGIC = b"SQLite format 3\x00"
PG_MAGIC = b"PGDMP"
_STAMP = "%Y%m%dT%H%M%S.%fZ"
_NAME = re.compile(r"^(?P<prefix>.+)-(?P<stamp>\d{8}T\d{6}\.\d{6}Z)\.(?:db|dump)$")


class BackupError(Exception):
    """What went wrong, in words an operator acts on (no traceback is shown for it)."""


@dataclass(frozen=True)
class Backup:
    path: Path
    taken: datetime  # UTC, from the name


def is_sqlite(db_url: str) -> bool:
    return make_url(db_url).get_backend_name() == "sqlite"


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner enters: made 0700 when new; an existing one that others
    may read is refused rather than narrowed, since it may be a shared directory like /tmp."""
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is narrowed by the umask only, never widened
        return path
    if not path.is_dir():
        raise BackupError(f"{path} is not a directory")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise BackupError(f"{path} may be read by others (mode {mode:04o}): backups hold password hashes, "
                          f"give a directory of mode 0700 (chmod 700 {path})")
    return path


def backups(directory: Path, prefix: str = PERIODIC_PREFIX) -> list[Backup]:
    """The whole backups named ``<prefix>-<time>`` in ``directory``, oldest first."""
    found = []
    if directory.is_dir():
        for entry in directory.iterdir():
            match = _NAME.match(entry.name)
            if match and match["prefix"] == prefix and entry.is_file():
                taken = datetime.strptime(match["stamp"], _STAMP).replace(tzinfo=UTC)
                found.append(Backup(entry, taken))
    return sorted(found, key=lambda b: b.taken)


def prune(directory: Path, keep: int, prefix: str = PERIODIC_PREFIX) -> list[Path]:
    """Remove all but the newest ``keep`` backups of ``prefix``; the removed files."""
    found = backups(directory, prefix)
    old = found[: max(0, len(found) - keep)]
    for b in old:
        b.path.unlink(missing_ok=True)
    return [b.path for b in old]


def keep_ca(pki: Path, directory: Path) -> Path | None:
    """A copy of the CA in ``pki`` (a data dir's) as ``directory/pki``, renewed when it differs;
    the copy, or None where there is no CA (a database backed up without its node's data dir)."""
    if not all((pki / name).is_file() for name in CA_FILES):
        return None
    out = directory / PKI_DIR
    for name in CA_FILES:
        data = (pki / name).read_bytes()
        if not (out / name).is_file() or (out / name).read_bytes() != data:
            write_private(out / name, data)
    return out


def restore_ca(file: Path, data_dir: Path) -> Path | None:
    """The CA kept beside the backup ``file`` into ``data_dir/pki`` (the node's own certificate is
    issued anew under it at its start); the CA's new place, or None where none was kept."""
    kept = file.parent / PKI_DIR
    if not all((kept / name).is_file() for name in CA_FILES):
        return None
    for name in CA_FILES:
        write_private(data_dir / PKI_DIR / name, (kept / name).read_bytes())
    return data_dir / PKI_DIR


def backup(db_url: str, directory: Path, prefix: str = PREFIX, now: datetime | None = None,
           data_dir: Path | None = None) -> Path:
    """Back the database up into a new file in ``directory`` while the node works on it, with the
    CA of ``data_dir`` beside it (``keep_ca``); the file. Blocking: the node runs it in a thread."""
    sqlite = is_sqlite(db_url)
    if sqlite and not _sqlite_path(db_url).is_file():  # said before a backup directory is made for nothing
        raise BackupError(f"no database at {_sqlite_path(db_url)} (give the node's --data-dir, or --db)")
    private_dir(directory)
    stamp = (now or datetime.now(UTC)).strftime(_STAMP)
    final = directory / f"{prefix}-{stamp}.{'db' if sqlite else 'dump'}"
    part = final.with_name(final.name + ".part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if sqlite:
            os.close(fd)
            fd = -1
            _sqlite_backup(_sqlite_path(db_url), part)
        else:
            _pg(["pg_dump", "--format=custom", "--no-password"], db_url, stdout=fd)
            os.fsync(fd)
        if data_dir is not None:
            keep_ca(data_dir / PKI_DIR, directory)
        os.replace(part, final)
        _fsync_dir(directory)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        if fd >= 0:
            os.close(fd)
    return final


async def backup_async(db_url: str, directory: Path, prefix: str = PREFIX, data_dir: Path | None = None) -> Path:
    return await asyncio.to_thread(backup, db_url, directory, prefix, None, data_dir)


def restore(file: Path, db_url: str, force: bool = False) -> str:
    """Restore the backup ``file`` into the database of ``db_url``, which must be empty (or, with
    ``force``, is emptied first), then migrate it to this version's schema; the revision reached."""
    kind = backup_kind(file)
    if is_sqlite(db_url) != (kind == "sqlite"):
        if kind == "sqlite":
            raise BackupError(f"{file} is an SQLite database: it restores into an SQLite file (no --db)")
        raise BackupError(f"{file} is a PostgreSQL dump (pg_dump -Fc): it restores into a PostgreSQL "
                          "database (--db postgresql+asyncpg://USER:PASSWORD@HOST/DB)")
    if kind == "sqlite":
        _sqlite_restore(file, _sqlite_path(db_url), force)
    else:
        _pg_restore(file, db_url, force)
    try:
        upgrade_schema(db_url)
    except CommandError as err:  # a backup of a newer nimbostack: its revision is unknown here
        raise BackupError(f"the restored database cannot be brought to this version's schema: {err}") from None
    return schema_revision(db_url) or "?"


def backup_kind(file: Path) -> str:
    """"sqlite" or "postgresql", from the file's first bytes."""
    try:
        with open(file, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        raise BackupError(f"no such file: {file}") from None
    except IsADirectoryError:
        raise BackupError(f"{file} is a directory, not a backup file") from None
    except OSError as err:
        raise BackupError(f"cannot read {file}: {err.strerror}") from None
    if head == SQLITE_MAGIC:
        return "sqlite"
    if head.startswith(PG_MAGIC):
        return "postgresql"
    raise BackupError(f"{file} is not a nimbostack backup: neither an SQLite database nor a pg_dump "
                      "custom-format archive (pg_dump -Fc)")


def schema_revision(db_url: str) -> str | None:
    """The Alembic revision the database is at (None: no schema)."""
    if is_sqlite(db_url):
        conn = sqlite3.connect(_sqlite_path(db_url))
        try:
            if not _sqlite_tables(conn):
                return None
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            return str(row[0]) if row else None
        finally:
            conn.close()
    return asyncio.run(_pg_revision(db_url))


# --- SQLite ----------------------------------------------------------------------------------------


def _sqlite_path(db_url: str) -> Path:
    database = make_url(db_url).database
    if not database or database == ":memory:":
        raise BackupError(f"{db_url}: not an SQLite file")
    return Path(database)


def _sqlite_tables(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]


def _sqlite_backup(source: Path, part: Path) -> None:
    # mode=rw: never create an empty database where the operator named a wrong one
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=rw", uri=True)
    try:
        src.execute("PRAGMA busy_timeout=30000")
        dst = sqlite3.connect(part)
        try:
            # one step (pages=-1): one read transaction, so the copy is the database as one commit
            # left it; in WAL mode that reader holds up none of the node's writes
            src.backup(dst)
            # a backup is one self-contained file: no -wal or -shm beside it when it is opened
            dst.execute("PRAGMA journal_mode=DELETE")
            if dst.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise BackupError(f"the copy of {source} failed its integrity check")
        finally:
            dst.close()
    except sqlite3.DatabaseError as err:
        raise BackupError(f"{source}: {err}") from None
    finally:
        src.close()
    with open(part, "rb") as f:
        os.fsync(f.fileno())


def _sqlite_restore(file: Path, target: Path, force: bool) -> None:
    try:
        src = sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = _sqlite_tables(src)
        except sqlite3.DatabaseError as err:
            src.close()
            raise BackupError(f"{file} is not a readable SQLite database: {err}") from None
    except sqlite3.OperationalError as err:
        raise BackupError(f"cannot open {file}: {err}") from None
    try:
        if "alembic_version" not in tables:
            raise BackupError(f"{file} is an SQLite database but not a nimbostack one (no alembic_version table)")
        if target.exists() and target.stat().st_size > 0:
            existing = sqlite3.connect(target)
            try:
                in_use = _sqlite_tables(existing)
            except sqlite3.DatabaseError:
                in_use = ["?"]  # not even a database: still something the operator may want
            finally:
                existing.close()
            if in_use and not force:
                raise BackupError(f"{target} holds a database already ({len(in_use)} tables): restore into a "
                                  "fresh data dir, or give --force to replace it (stop its node first)")
        if force:
            for leftover in (target, Path(f"{target}-wal"), Path(f"{target}-shm"), Path(f"{target}-journal")):
                leftover.unlink(missing_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(target, 0o600)
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- PostgreSQL ------------------------------------------------------------------------------------


def _libpq_env(url: URL) -> dict[str, str]:
    """The connection as libpq's environment: the password never shows in a process listing."""
    env = dict(os.environ)
    for key, value in (("PGHOST", url.host), ("PGPORT", url.port), ("PGUSER", url.username),
                       ("PGPASSWORD", url.password), ("PGDATABASE", url.database)):
        if value is not None:
            env[key] = str(value)
    ssl = url.query.get("ssl") or url.query.get("sslmode")
    if isinstance(ssl, str):
        env["PGSSLMODE"] = {"true": "require", "false": "disable"}.get(ssl.lower(), ssl)
    return env


def _pg(command: list[str], db_url: str, stdout: int | None = None) -> None:
    tool = shutil.which(command[0])
    if tool is None:
        raise BackupError(f"{command[0]} is not installed (Debian: apt-get install postgresql-client)")
    url = make_url(db_url)
    args = [tool, *command[1:]]
    if command[0] == "pg_restore":
        args += ["--dbname", url.database or "postgres"]
    done = subprocess.run(args, env=_libpq_env(url), stdout=stdout if stdout is not None else subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise BackupError(f"{command[0]} failed: {done.stderr.strip() or f'exit status {done.returncode}'}")


def _asyncpg_dsn(db_url: str) -> str:
    url = make_url(db_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def _pg_tables(db_url: str) -> list[str]:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_dsn(db_url))
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return [r["tablename"] for r in rows]
    finally:
        await conn.close()


async def _pg_revision(db_url: str) -> str | None:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_dsn(db_url))
    try:
        if not await conn.fetchval("SELECT to_regclass('public.alembic_version') IS NOT NULL"):
            return None
        return await conn.fetchval("SELECT version_num FROM alembic_version")  # type: ignore[no-any-return]
    finally:
        await conn.close()


async def _pg_empty_schema(db_url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_dsn(db_url))
    try:
        # the whole schema, not the dump's objects only (pg_restore --clean): tables a newer
        # schema added would stay and fail the migration that creates them
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()


def _pg_restore(file: Path, db_url: str, force: bool) -> None:
    try:
        tables = asyncio.run(_pg_tables(db_url))
    except Exception as err:  # asyncpg's and the socket's errors have no common base but Exception
        raise BackupError(f"cannot reach the database {shown_url(db_url)}: {err}") from None
    if tables:
        if not force:
            raise BackupError(f"the database {shown_url(db_url)} is not empty ({len(tables)} tables): restore into "
                              "an empty database, or give --force to replace what it holds (stop its nodes first)")
        asyncio.run(_pg_empty_schema(db_url))
    # --no-owner/--no-privileges: the dump restores as the role of --db, whoever took it
    _pg(["pg_restore", "--no-password", "--no-owner", "--no-privileges", "--exit-on-error", str(file)], db_url)


def shown_url(db_url: str) -> str:
    return make_url(db_url).render_as_string(hide_password=True)
