"""Backup and restore (issue 16): ``nimbostack db backup`` while the node runs and writes, ``db
restore`` into a fresh data dir (or an empty PostgreSQL database) that a new node then serves
unchanged; the node's periodic backups and their retention; older backups migrated on restore; and
the operator's mistakes said in one line. On SQLite, or on PostgreSQL (pg_dump/pg_restore) when
NIMBOSTACK_TEST_DB is set."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import make_url

from nimbostack.db.engine import alembic_config, sqlite_url
from tests.conftest import Api, Running, build_zone, wait_for
from tests.conftest import _fresh_postgres as fresh_postgres

PG = os.environ.get("NIMBOSTACK_TEST_DB")
SUFFIX = ".dump" if PG else ".db"
HEAD = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()

# what an operator sees of the cloud: each as its Query lists it
QUERIES = (
    "QueryZone",
    "QueryCluster",
    "QueryHost",
    "QueryPrimaryStorage",
    "QueryBackupStorage",
    "QueryVmInstance",
    "QueryVmNic",
    "QueryVolume",
    "QueryL2Network",
    "QueryL3Network",
    "QueryIpRange",
    "QueryImage",
    "QueryInstanceOffering",
    "QueryDiskOffering",
    "QueryUserTag",
    "QuerySystemTag",
    "QueryGlobalConfig",
)


def db(*args: str) -> subprocess.CompletedProcess[str]:
    """``nimbostack db ...`` as the operator runs it, in a process of its own."""
    return subprocess.run([sys.executable, "-m", "nimbostack.main", "db", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def refused(done: subprocess.CompletedProcess[str], *words: str) -> str:
    """A clear refusal: an exit status, one line naming the problem, no traceback."""
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in done.stderr, done.stderr
    return done.stderr


def db_args(url: str | None) -> list[str]:
    return ["--db", url] if url else []


def new_database() -> str | None:
    """A fresh empty PostgreSQL database on NIMBOSTACK_TEST_DB's server; None: the SQLite file of
    the data dir."""
    return fresh_postgres(PG) if PG else None


def snapshot(api: Api) -> dict[str, list[dict[str, Any]]]:
    return {q: sorted(api.query(q), key=lambda r: (r.get("uuid") or "", r.get("category") or "",
                                                   r.get("name") or "")) for q in QUERIES}


def backup_file(stdout: str) -> Path:
    path = Path(stdout.splitlines()[-1])
    assert path.is_file() and path.name.endswith(SUFFIX), stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    return path


class Writer(threading.Thread):
    """Keeps creating user tags named w<n>-<i> on a resource over the API, one after the other."""

    def __init__(self, url: str, n: int, resource: tuple[str, str]) -> None:
        super().__init__(daemon=True)
        self.api = Api(url)
        self.api.login()
        self.n, self.resource = n, resource
        self.stop = threading.Event()
        self.started_calls = self.done_calls = 0
        self.error: BaseException | None = None

    def name_of(self, i: int) -> str:
        return f"w{self.n}-{i:05d}"

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.started_calls += 1
                self.api.call("CreateUserTag", resourceType=self.resource[0], resourceUuid=self.resource[1],
                              tag=self.name_of(self.done_calls))
                self.done_calls += 1
        except BaseException as err:  # the test reads it
            self.error = err


def test_a_backup_taken_while_the_node_writes_restores_the_same_cloud(node: Running, api: Api,
                                                                      tmp_path: Path) -> None:
    env = build_zone(api, hosts=2)
    vms = [
        api.call("CreateVmInstance", name=f"vm{i}", imageUuid=env["image"]["uuid"],
                 instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]])["inventory"]
        for i in range(6)
    ]
    api.call("StopVmInstance", uuid=vms[1]["uuid"])
    data = api.call("CreateDataVolume", name="data1", diskOfferingUuid=env["disk"]["uuid"])["inventory"]
    api.call("AttachDataVolumeToVm", volumeUuid=data["uuid"], vmInstanceUuid=vms[0]["uuid"])
    api.call("CreateUserTag", resourceType="VmInstanceVO", resourceUuid=vms[0]["uuid"], tag="team:red")
    api.call("UpdateGlobalConfig", category="vm", name="deletionPolicy", value="Direct")
    api.call("UpdateGlobalConfig", category="apiTimeout", name="CreateVmInstance", value="17m")

    writers = [Writer(node.url, n, ("ZoneVO", env["zone"]["uuid"])) for n in range(2)]
    for w in writers:
        w.start()
    wait_for(lambda: all(w.done_calls >= 3 for w in writers), 30, "the writers' first tags")
    done_before = [w.done_calls for w in writers]
    out = ok(db("backup", "--data-dir", str(node.data_dir), *db_args(node.db_url), "--to", str(tmp_path / "bk")))
    started_after = [w.started_calls for w in writers]
    done_after = [w.done_calls for w in writers]
    for w in writers:
        w.stop.set()
        w.join(60)
        assert w.error is None, w.error
    # the node kept taking writes while the backup ran
    assert sum(done_after) > sum(done_before), (done_before, done_after)
    path = backup_file(out)
    live = snapshot(api)

    target = tmp_path / "restored"
    url = new_database()
    said = ok(db("restore", str(path), "--data-dir", str(target), *db_args(url)))
    assert HEAD in said
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    again = Running(target, url)
    try:
        api2 = Api(again.url)
        api2.login()
        restored = snapshot(api2)
    finally:
        again.stop()

    # every write the node finished before the backup began is in it, none that began after it
    # ended, and each writer's tags without a hole: the backup is the database as of one commit
    writer_tags = {q: [r for r in restored[q] if r["tag"].startswith("w")] for q in ("QueryUserTag",)}
    names = {r["tag"] for r in writer_tags["QueryUserTag"]}
    for w, before, after in zip(writers, done_before, started_after, strict=True):
        mine = sorted(t for t in names if t.startswith(f"w{w.n}-"))
        assert before <= len(mine) <= after, (before, len(mine), after)
        assert mine == [w.name_of(i) for i in range(len(mine))]
    live_by_uuid = {r["uuid"]: r for r in live["QueryUserTag"]}
    for tag in writer_tags["QueryUserTag"]:
        assert live_by_uuid[tag["uuid"]] == tag
    # and everything else is as the node had it
    restored["QueryUserTag"] = [r for r in restored["QueryUserTag"] if not r["tag"].startswith("w")]
    live["QueryUserTag"] = [r for r in live["QueryUserTag"] if not r["tag"].startswith("w")]
    assert len(live["QueryVmInstance"]) == 6 and len(live["QueryVolume"]) == 7
    assert {r["state"] for r in live["QueryVmInstance"]} == {"Running", "Stopped"}
    # but the restored node's start reconnects each host and its storage (recovery): an operation
    # on them, which their lastOpDate tells
    for q in ("QueryHost", "QueryPrimaryStorage"):
        for inventory in (*restored[q], *live[q]):
            assert inventory["status"] == "Connected"
            del inventory["lastOpDate"]
    for q in QUERIES:
        assert restored[q] == live[q], q


def test_the_node_backs_itself_up_periodically_and_keeps_the_last_n(tmp_path: Path) -> None:
    url = new_database()
    data = tmp_path / "data"
    running = Running(data, url, background=True)
    try:
        api = Api(running.url)
        api.login()
        api.call("CreateZone", name="zone-of-the-backups")
        directory = data / "db-backups"
        assert not list(directory.glob(f"*{SUFFIX}"))  # the default interval is a day
        api.call("UpdateGlobalConfig", category="database", name="backup.retention", value="2")
        api.call("UpdateGlobalConfig", category="database", name="backup.interval", value="1")
        seen: set[str] = set()
        most = 0

        def four_taken() -> bool:
            nonlocal most
            now = {p.name for p in directory.glob(f"nimbostack-periodic-*{SUFFIX}")}
            most = max(most, len(now))
            seen.update(now)
            return len(seen) >= 4

        wait_for(four_taken, 60, "four periodic backups", every=0.05)
        api.call("UpdateGlobalConfig", category="database", name="backup.interval", value="0")
        time.sleep(1.5)  # one that was being taken as the interval changed is done and pruned
        kept = sorted(p.name for p in directory.glob(f"nimbostack-periodic-*{SUFFIX}"))
        time.sleep(2.5)
        # interval 0: none taken any more
        assert sorted(p.name for p in directory.glob(f"nimbostack-periodic-*{SUFFIX}")) == kept
        # retention 2: the newest two stay (a third only for the moment between writing and pruning)
        assert len(kept) == 2 and kept == sorted(seen)[-2:], (kept, sorted(seen))
        assert most <= 3
        assert not list(directory.glob("*.part"))
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert all(stat.S_IMODE((directory / k).stat().st_mode) == 0o600 for k in kept)
        # the node's CA kept beside them, as private as they are
        assert (directory / "pki" / "ca.key").read_bytes() == (data / "pki" / "ca.key").read_bytes()
        assert stat.S_IMODE((directory / "pki" / "ca.key").stat().st_mode) == 0o600
        # a backup of the node's does not count against its retention
        manual = backup_file(ok(db("backup", "--data-dir", str(data), *db_args(url))))
        assert manual.parent == directory
        api.call("UpdateGlobalConfig", category="database", name="backup.interval", value="1")
        wait_for(lambda: not set(p.name for p in directory.glob(f"nimbostack-periodic-*{SUFFIX}")) & set(kept),
                 30, "the old periodic backups pruned")
        assert manual.exists()
        api.call("UpdateGlobalConfig", category="database", name="backup.interval", value="0")
        err = api.fails("UpdateGlobalConfig", category="database", name="backup.retention", value="0")
        assert "minimum" in err["details"]
    finally:
        running.stop()
    # and what it took restores
    target = tmp_path / "restored"
    newest = sorted(directory.glob(f"nimbostack-periodic-*{SUFFIX}"))[-1]
    ok(db("restore", str(newest), "--data-dir", str(target), *db_args(new_url := new_database())))
    again = Running(target, new_url)
    try:
        api2 = Api(again.url)
        api2.login()
        assert [z["name"] for z in api2.query("QueryZone")] == ["zone-of-the-backups"]
        assert api2.query("QueryGlobalConfig", ("category", "=", "database"), ("name", "=", "backup.retention"))[
            0]["value"] == "2"
    finally:
        again.stop()


def _old_database(tmp_path: Path) -> str:
    """A database at an older schema revision, as a backup from before an upgrade would hold, with
    a config an operator had changed."""
    url = new_database() or sqlite_url(tmp_path / "old")
    (tmp_path / "old").mkdir(exist_ok=True)
    command.upgrade(alembic_config(url), "0005")
    sql = ("INSERT INTO global_config (category, name, description, \"defaultValue\", value) "
           "VALUES ('vm', 'deletionPolicy', 'How a deleted VM is removed', 'Delay', 'Never')")
    if url.startswith("sqlite"):
        conn = sqlite3.connect(tmp_path / "old" / "nimbostack.db")
        conn.execute(sql)
        conn.commit()
        conn.close()
    else:
        import asyncio

        import asyncpg

        async def insert() -> None:
            conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(insert())
    return url


def test_an_older_backup_is_brought_to_the_current_schema(tmp_path: Path) -> None:
    old = _old_database(tmp_path)
    path = backup_file(ok(db("backup", "--data-dir", str(tmp_path / "old"), *db_args(PG and old),
                             "--to", str(tmp_path / "bk"))))
    target = tmp_path / "restored"
    url = new_database()
    said = ok(db("restore", str(path), "--data-dir", str(target), *db_args(url)))
    assert f"schema {HEAD}" in said and HEAD != "0005"
    running = Running(target, url)
    try:
        api = Api(running.url)
        api.login()
        (policy,) = api.query("QueryGlobalConfig", ("category", "=", "vm"), ("name", "=", "deletionPolicy"))
        assert policy["value"] == "Never"
        # and the schema of today works on it: a table of a later revision (0007's management nodes)
        assert api.query("QueryManagementNode")
        api.call("CreateZone", name="after-the-upgrade")
    finally:
        running.stop()


def test_mistakes_are_said_in_one_line(tmp_path: Path) -> None:
    old = _old_database(tmp_path)
    path = backup_file(ok(db("backup", "--data-dir", str(tmp_path / "old"), *db_args(PG and old),
                             "--to", str(tmp_path / "bk"))))
    refused(db("restore", str(tmp_path / "nope.db"), "--data-dir", str(tmp_path / "n1")), "no such file", "nope.db")
    assert not (tmp_path / "n1").exists()
    junk = tmp_path / "junk.db"
    junk.write_text("not a backup\n")
    refused(db("restore", str(junk), "--data-dir", str(tmp_path / "n2")), "not a nimbostack backup")
    # a backup of one kind into a database of the other
    if PG:
        refused(db("restore", str(path), "--data-dir", str(tmp_path / "n3")), "PostgreSQL dump")
    else:
        refused(db("restore", str(path), "--data-dir", str(tmp_path / "n3"), "--db",
                   "postgresql+asyncpg://nobody:x@127.0.0.1:1/none"), "SQLite database")
    # a target that holds a database: refused, then replaced with --force
    target, url = tmp_path / "restored", new_database()
    ok(db("restore", str(path), "--data-dir", str(target), *db_args(url)))
    refused(db("restore", str(path), "--data-dir", str(target), *db_args(url)), "--force")
    assert HEAD in ok(db("restore", str(path), "--data-dir", str(target), *db_args(url), "--force"))
    # backing up what is not there, or into a directory others may read
    refused(db("backup", "--data-dir", str(tmp_path / "none")), "no database")
    assert not (tmp_path / "none").exists()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    refused(db("backup", "--data-dir", str(tmp_path / "old"), *db_args(PG and old), "--to", str(shared)),
            "chmod 700")
    assert not list(shared.iterdir())
    if PG:  # and a database that refuses the connection
        wrong = make_url(PG).set(password="not-the-password").render_as_string(hide_password=False)
        refused(db("backup", "--db", wrong, "--to", str(tmp_path / "bk")), "pg_dump failed", "password")
