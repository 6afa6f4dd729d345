"""``nimbostack upgrade`` on the database of an earlier release (tests/fixtures/release-0006.sql,
made by tests/fixtures/make_release_db.sh from that release's own code): every resource is there
afterwards by the Query APIs, its VMs start, and a database of a newer version is refused untouched."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import MetaData, text
from sqlalchemy import types as sqltypes
from sqlalchemy.ext.asyncio import create_async_engine

from nimbostack.db.backup import schema_revision
from nimbostack.db.engine import NewerSchema, alembic_config, known_revisions, sqlite_url, upgrade_schema
from nimbostack.main import main
from tests.conftest import Api, Running, wait_for
from tests.conftest import _fresh_postgres as fresh_postgres

PG = os.environ.get("NIMBOSTACK_TEST_DB")  # also: the release's database on PostgreSQL

FIXTURES = Path(__file__).parent.parent / "fixtures"
RELEASE = json.loads((FIXTURES / "release-0006.json").read_text())


def release_data_dir(path: Path) -> Path:
    """A data dir holding the earlier release's database, as that release left it."""
    path.mkdir()
    conn = sqlite3.connect(path / "nimbostack.db")
    conn.executescript((FIXTURES / "release-0006.sql").read_text())
    conn.close()
    return path


def release_on_postgres(data: Path) -> str:
    """The release's database on PostgreSQL (NIMBOSTACK_TEST_DB's server): its schema made by its
    own migrations (up to its revision), then its rows copied from the SQLite fixture."""
    url = fresh_postgres(PG)
    command.upgrade(alembic_config(url), RELEASE["revision"])
    source = sqlite3.connect(data / "nimbostack.db")

    async def copy() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                meta = MetaData()
                await conn.run_sync(meta.reflect)
                for table in meta.sorted_tables:
                    if table.name == "alembic_version":
                        continue
                    names = [c.name for c in table.columns]
                    rows = source.execute(f'SELECT {", ".join(chr(34) + n + chr(34) for n in names)} '
                                          f'FROM "{table.name}"').fetchall()
                    if rows:
                        await conn.execute(table.insert(), [
                            {n: _pg_value(table.columns[n].type, v) for n, v in zip(names, row, strict=True)}
                            for row in rows])
                    # rows copied with their ids leave a serial's sequence behind them, as pg_dump would not
                    for column in table.primary_key.columns:
                        if isinstance(column.type, sqltypes.Integer) and rows:
                            await conn.execute(text(
                                f"SELECT setval(pg_get_serial_sequence('\"{table.name}\"', '{column.name}'), "
                                f'(SELECT max("{column.name}") FROM "{table.name}")) '
                                f"WHERE pg_get_serial_sequence('\"{table.name}\"', '{column.name}') IS NOT NULL"))
        finally:
            await engine.dispose()

    asyncio.run(copy())
    source.close()
    (data / "nimbostack.db").unlink()  # the node's database is PostgreSQL's now, as --db would name it
    return url


def _pg_value(kind: Any, value: Any) -> Any:
    """An SQLite value as PostgreSQL's column takes it: SQLite keeps times as text, booleans as 0/1."""
    if value is None:
        return None
    if isinstance(kind, sqltypes.DateTime):
        return datetime.fromisoformat(value)
    if isinstance(kind, sqltypes.Boolean):
        return bool(value)
    return value


def upgrade(data: Path, capsys: pytest.CaptureFixture[str], db: str | None = None) -> tuple[int | str | None, str]:
    """``nimbostack upgrade --data-dir DATA [--db URL]``: (exit code, what it said)."""
    return upgrade_cli(["upgrade", "--data-dir", str(data), *(["--db", db] if db else [])], capsys)


def upgrade_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str | None, str]:
    try:
        code: int | str | None = main(argv)
    except SystemExit as exit_:  # a message as its code: what Python prints on stderr, exit status 1
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out + out.err + (f"{code}\n" if isinstance(code, str) else "")


def test_a_release_database_upgrades_with_a_backup_and_keeps_every_resource(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = release_data_dir(tmp_path / "data")
    db = release_on_postgres(data) if PG else None
    url = db or sqlite_url(data)
    assert schema_revision(url) == RELEASE["revision"] == "0006"
    _, head = known_revisions()

    code, said = upgrade(data, capsys, db)
    assert code == 0, said
    assert f"from 0006 to {head}" in said
    assert schema_revision(url) == head
    (taken,) = (data / "db-backups").glob("nimbostack-pre-upgrade-*")
    assert str(taken) in said and taken.suffix == (".dump" if PG else ".db")
    assert taken.stat().st_mode & 0o777 == 0o600
    # the backup is the release's database as it was
    if not PG:
        conn = sqlite3.connect(taken)
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0006"
        conn.close()

    code, said = upgrade(data, capsys, db)  # a second run (the code alone upgraded): nothing to migrate, a backup
    assert code == 0 and "already" in said, said
    assert len(list((data / "db-backups").glob("nimbostack-pre-upgrade-*"))) == 2

    # the release's hosts have their agent on a fixed port
    node = Running(data, db_url=db, agent_port=RELEASE["agentPort"])
    try:
        api = Api(node.url)
        api.login()  # the release's admin password still logs in
        for kind, uuids in RELEASE["resources"].items():
            found = {r["uuid"] for r in api.query(f"Query{kind}", ("uuid", "?=", ",".join(uuids)))}
            assert found == set(uuids), kind
        hosts = RELEASE["resources"]["Host"]
        in_release = ("uuid", "?=", ",".join(hosts))
        wait_for(lambda: {h["status"] for h in api.query("QueryHost", in_release)} == {"Connected"},
                 60, "the release's hosts to reconnect")
        attached = api.query("QueryVolume", ("name", "=", "data-attached"))[0]
        assert attached["vmInstanceUuid"] == RELEASE["resources"]["VmInstance"][0]
        free = api.query("QueryVolume", ("name", "=", "data-free"))[0]
        assert free["status"] == "NotInstantiated" and "vmInstanceUuid" not in free

        for uuid in RELEASE["resources"]["VmInstance"]:
            vm = vm_state(api, uuid)
            if vm["state"] == "Running":
                api.call("StopVmInstance", uuid=uuid)
            started = api.call("StartVmInstance", uuid=uuid)["inventory"]
            assert started["state"] == "Running" and started["hostUuid"] in hosts
            state = node.agent_call("/simulator/state", {"hostUuid": started["hostUuid"]})
            assert state["domains"].get(uuid) == "Running", state["domains"]  # the agent runs it, not only the table
        # and the new version's own work on the old data: the release's free volume attached, a new
        # VM from the release's image, offering and L3
        vm1 = RELEASE["resources"]["VmInstance"][1]
        assert api.call("AttachDataVolumeToVm", vmInstanceUuid=vm1, volumeUuid=free["uuid"])["inventory"][
            "vmInstanceUuid"] == vm1
        image, l3 = RELEASE["resources"]["Image"][0], RELEASE["resources"]["L3Network"][0]
        offering = RELEASE["resources"]["InstanceOffering"][0]
        new = api.call("CreateVmInstance", name="after-upgrade", imageUuid=image, instanceOfferingUuid=offering,
                       l3NetworkUuids=[l3])["inventory"]
        assert new["state"] == "Running"

        # an upgrade under the running node is refused, untouched
        backups = sorted((data / "db-backups").iterdir())
        code, said = upgrade(data, capsys, db)
        assert code not in (0, None) and "a management node works on this database" in said, said
        assert sorted((data / "db-backups").iterdir()) == backups
    finally:
        node.stop()


def vm_state(api: Api, uuid: str) -> dict[str, Any]:
    (vm,) = api.query("QueryVmInstance", ("uuid", "=", uuid))
    return vm


def test_a_newer_database_is_refused_and_left_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = release_data_dir(tmp_path / "data")
    upgrade_schema(sqlite_url(data))
    conn = sqlite3.connect(data / "nimbostack.db")
    conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    conn.commit()
    conn.close()
    before = {p.name: p.read_bytes() for p in data.iterdir()}

    code, said = upgrade(data, capsys)
    assert code not in (0, None)
    assert "9999_from_the_future" in said and "newer than this nimbostack" in said
    assert "Traceback" not in said and said.count("\n") == 1, said
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before  # no backup taken, no byte changed

    # the node itself refuses it at its start, in the same words, before any change: the command in
    # one line before it serves, its migration (what a node started from code runs) by NewerSchema
    code, said = upgrade_cli(["server", "--data-dir", str(data), "--port", "0"], capsys)
    assert code not in (0, None) and said.startswith("nimbostack server: the database is at schema revision 9999")
    with pytest.raises(NewerSchema, match="9999_from_the_future"):
        upgrade_schema(sqlite_url(data))
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before


def test_upgrade_says_in_one_line_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, said = upgrade(tmp_path / "nothing-here", capsys)
    assert code not in (0, None) and "no database at" in said and said.count("\n") == 1, said
    assert not (tmp_path / "nothing-here").exists()


def test_admin_password_sets_the_first_password_and_ends_the_admins_sessions(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    data = tmp_path / "data"
    monkeypatch.setattr("sys.stdin", io.StringIO("first-password\n"))
    assert main(["admin-password", "--data-dir", str(data)]) == 0  # before the node ever started
    node = Running(data)
    try:
        api = Api(node.url)
        assert api.fails("LogInByAccount", accountName="admin",
                         password=hashlib.sha512(b"password").hexdigest())["code"] == "ID.1004"
        api.login("admin", "first-password")
        monkeypatch.setattr("sys.stdin", io.StringIO("second-password\n"))
        assert main(["admin-password", "--data-dir", str(data)]) == 0  # while it runs: the session ends
        wait_for(lambda: not api.raw("QueryZone", {})["success"], 30, "the admin's session to end")
        api.login("admin", "second-password")
    finally:
        node.stop()
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    code, said = upgrade_cli(["admin-password", "--data-dir", str(data)], capsys)
    assert code not in (0, None) and "at least 8 characters" in said
