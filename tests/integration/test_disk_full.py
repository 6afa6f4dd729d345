"""A full disk under the management node's database (issue 12, item 9): while it is full, calls fail
with SYS.1011 (never SYS.1000, never a traceback) and /health answers 503; a job the disk filled
under rolls back what it took; once space returns the same node, not restarted, works again, and
what it had stored is intact.

The disk really fills: the node's data dir (on SQLite, its database; on PostgreSQL, a tablespace
that holds the test's database) lives on a tmpfs the test mounts with a size limit and fills with a
filler file until the kernel answers ENOSPC. A tmpfs needs no image file nor loop device, and its
ENOSPC is the one a full ext4 gives (a write(2) that fails); RLIMIT_FSIZE would instead kill or
fail only this process's writes with EFBIG, which is not what a full disk looks like to SQLite or
to a PostgreSQL server in another process. Mounting needs root (CAP_SYS_ADMIN), as CI has."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import make_url

from nimbostack.core import spec
from nimbostack.core.errors import MANAGEMENT_STORAGE_FULL
from tests.conftest import Api, Running, build_zone, wait_for

SIZE = 128 << 20  # room for the node (a few MiB) and for PostgreSQL's copy of template1
DELAY = 3.0  # how long the simulated host sits on the mid-way VM's root volume


@contextmanager
def small_filesystem(size: int) -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="nimbo-full-"))
    # mode 0755: PostgreSQL's server, another user, reaches its tablespace below it
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)], capture_output=True, text=True
    )
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


def fill(where: Path) -> Path:
    """A filler file that takes every free byte of the filesystem, as the kernel counts them."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, 4096, 1):  # the big ones first, then the last page's bytes
            block = b"\0" * chunk
            while True:
                try:
                    if os.write(fd, block) < chunk:
                        break
                except OSError as err:
                    assert err.errno == errno.ENOSPC, err
                    break
    finally:
        os.close(fd)
    st = os.statvfs(where)
    assert st.f_bavail * st.f_frsize < 4096, "the filler left space free"
    return filler


def _pg(url: str, *statements: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


@contextmanager
def database_on(where: Path) -> Iterator[str | None]:
    """The node's database URL: None for its SQLite file in the data dir, or with
    NIMBOSTACK_TEST_DB a new PostgreSQL database whose tables live in a tablespace on ``where``."""
    server = os.environ.get("NIMBOSTACK_TEST_DB")
    if not server:
        yield None
        return
    if make_url(server).host not in ("127.0.0.1", "localhost", "::1"):
        pytest.skip("a tablespace on the test's filesystem needs the PostgreSQL server on this machine")
    space = where / "pg"
    space.mkdir()
    shutil.chown(space, "postgres", "postgres")
    name = f"nimbo_full_{uuid.uuid4().hex[:10]}"
    _pg(server, f"CREATE TABLESPACE {name} LOCATION '{space}'", f'CREATE DATABASE "{name}" TABLESPACE {name}')
    try:
        yield server.rsplit("/", 1)[0] + "/" + name
    finally:
        _pg(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f"DROP TABLESPACE IF EXISTS {name}")


def health(node: Running) -> tuple[int, dict[str, Any]]:
    r = httpx.get(f"{node.url}/health", timeout=30)
    return r.status_code, r.json()


def assert_storage_full(error: dict[str, Any]) -> None:
    assert error["code"] == MANAGEMENT_STORAGE_FULL, error
    assert "full" in error["description"] and "Traceback" not in error["details"], error


def vm_params(env: dict[str, Any], name: str) -> dict[str, Any]:
    return {
        "name": name,
        "instanceOfferingUuid": env["offering"]["uuid"],
        "imageUuid": env["image"]["uuid"],
        "l3NetworkUuids": [env["l3"]["uuid"]],
    }


def capacity(api: Api, env: dict[str, Any]) -> tuple[int, int, int]:
    """What each VM takes alike: the host's free CPU and memory, the storage's free bytes."""
    (host,) = api.query("QueryHost", ("uuid", "=", env["hosts"][0]["uuid"]))
    (ps,) = api.query("QueryPrimaryStorage", ("uuid", "=", env["ps"]["uuid"]))
    return host["availableCpuCapacity"], host["availableMemoryCapacity"], ps["availableCapacity"]


def free_ips(api: Api, env: dict[str, Any]) -> int:
    # not in capacity(): the first VM of the L3 also takes its DHCP server's IP
    return int(api.call("GetIpAddressCapacity", l3NetworkUuids=[env["l3"]["uuid"]])["availableCapacity"])


def test_a_full_disk_fails_calls_cleanly_and_the_node_recovers_without_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="nimbostack.core.flow")
    with small_filesystem(SIZE) as small, database_on(small) as db_url:
        node = Running(small / "data", db_url)
        try:
            api = Api(node.url)
            api.login()
            env = build_zone(api)
            free = capacity(api, env)
            before = api.call("CreateVmInstance", **vm_params(env, "vm-before"))["inventory"]
            one_vm = tuple(a - b for a, b in zip(free, capacity(api, env), strict=True))
            assert all(one_vm), one_vm
            ips = free_ips(api, env)

            # a VM whose creation is mid-way, at the host, when the disk fills
            host = env["hosts"][0]["uuid"]
            fault = {"hostUuid": host, "path": "/storage/local/create-root", "delay": DELAY}
            assert node.agent_call("/simulator/fault", fault)["success"]
            body = {**vm_params(env, "vm-midway"), "session": {"uuid": api.session}}
            full_name = spec.messages()["CreateVmInstance"].full_name
            midway = httpx.post(f"{node.url}/zstack/api", json={full_name: body}).json()
            assert midway["state"] == "Processing", midway

            filler = fill(small)
            # Writes the database had room for already (SQLite's log reuses its file once copied
            # back; PostgreSQL fills a table's last page) may still get through: the first that
            # needs new space fails, and every one after it while the disk stays full.
            stored = []
            for i in range(500):
                reply = api.raw("CreateZone", {"name": f"while-full-{i}"})
                if not reply["success"]:
                    assert_storage_full(reply["error"])
                    break
                stored.append(reply["inventory"]["uuid"])
            else:
                pytest.fail("500 zones were stored on a full disk")
            assert_storage_full(api.fails("CreateZone", name="refused"))
            assert_storage_full(api.fails("CreateVmInstance", **vm_params(env, "vm-refused")))
            status, answer = health(node)
            assert status == 503 and answer["status"] == "failing" and "full" in answer["database"], answer
            # reads still work on a full disk
            assert {z["name"] for z in api.query("QueryZone")} >= {"zone1"}

            def result() -> dict[str, Any] | None:
                answer = httpx.get(f"{node.url}/zstack/api/result/{midway['uuid']}", timeout=30).json()
                return json.loads(answer["result"]) if answer["state"] == "Done" else None

            # The mid-way VM meets the full disk after the host answers, and its undo waits for
            # space. On SQLite always (its log must grow); PostgreSQL may find room for its few
            # row updates in pages it has, and then the VM is made whole.
            wait_for(
                lambda: "waits for the database's disk" in caplog.text or (db_url and result()),
                DELAY + 30,
                "the mid-way VM's undo to wait for space",
            )
            time.sleep(1.5)  # an undo or two refused meanwhile
            if db_url is None:
                # SQLite: the node sees the full filesystem itself. PostgreSQL's disk it cannot see:
                # there the state is the last write's, and the mid-way VM's may have got through
                assert health(node)[0] == 503

            filler.unlink()  # space returns; the node is not restarted
            (reply,) = wait_for(result, 60, "the mid-way job's end").values()
            made = ["vm-before", "vm-after"]
            if reply["success"] and db_url is not None:
                made.append("vm-midway")
            else:
                assert not reply["success"], reply
                assert_storage_full(reply["error"])
            node.agent_call("/simulator/fault", {"hostUuid": host, "clear": True})

            after = api.call("CreateVmInstance", **vm_params(env, "vm-after"))["inventory"]
            zone = api.call("CreateZone", name="after-full")["inventory"]
            status, answer = health(node)
            assert (status, answer["status"], answer["database"]) == (200, "ok", "ok"), answer

            # what was stored before and while full is intact; the refused and the mid-way are gone
            vms = {v["name"]: v for v in api.query("QueryVmInstance")}
            assert set(vms) == set(made), sorted(vms)
            assert vms["vm-before"]["uuid"] == before["uuid"] and vms["vm-before"]["state"] == "Running"
            assert vms["vm-after"]["uuid"] == after["uuid"] and vms["vm-after"]["state"] == "Running"
            zones = {z["uuid"] for z in api.query("QueryZone")}
            assert {env["zone"]["uuid"], zone["uuid"], *stored} <= zones
            assert len(zones) == 2 + len(stored)
            # a mid-way VM that failed gave its host capacity, storage and IP back
            assert capacity(api, env) == tuple(f - len(made) * d for f, d in zip(free, one_vm, strict=True))
            assert free_ips(api, env) == ips - (len(made) - 1)
            assert len(api.query("QueryVolume")) == len(made) == len(api.query("QueryVmNic"))
        finally:
            node.stop()
        if db_url is None:
            with sqlite3.connect(small / "data" / "nimbostack.db") as conn:
                assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
