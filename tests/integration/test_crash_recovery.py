"""Reliability: SIGKILL the management node while 200 CreateVmInstance calls are in flight, start it
again on the same data dir, and check that recovery left a consistent world behind: no VM stuck in
a transitional state, no IP without its NIC (nor a NIC without its IP), host capacity equal to what
its VMs hold, and an answer for every job the dead node had accepted. And a restarted node serves
before its hosts have all answered: they read Connecting until they have."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nimbostack.compute.allocator import HOLDS_CAPACITY
from nimbostack.core import spec
from nimbostack.wire import pki
from tests.conftest import Api, build_zone, free_port, wait_for

VMS = 200
KILL_AFTER = 50  # accepted jobs (answered Processing) before the SIGKILL
RUNNING_BEFORE_KILL = 10  # ... and VMs that got to Running
TRANSITIONAL = {
    "Created",
    "Starting",
    "Stopping",
    "Rebooting",
    "Destroying",
    "Migrating",
    "Pausing",
    "Resuming",
    "Expunging",
}
MANAGEMENT_RESTARTED = "SYS.1010"


def _wait_until(what: str, ready: Any, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class Node:
    """``nimbostack server`` as a subprocess, on a fixed data dir and port across restarts."""

    def __init__(self, data_dir: Path, log_dir: Path, agent_port: int) -> None:
        self.data_dir, self.log_dir, self.agent_port = data_dir, log_dir, agent_port
        self.port, self.wire_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        log = open(self.log_dir / f"server-{self.runs}.log", "wb")  # noqa: SIM115 - the child writes it
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nimbostack.main",
                "server",
                "--data-dir",
                str(self.data_dir),
                "--listen",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--wire-port",
                str(self.wire_port),
                "--simulator-agent-url",
                f"https://127.0.0.1:{self.agent_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        _wait_until("the management node answers /health", lambda: _answers(self.url), 45, self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def agent_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    # the documented way: the management node's CA (made here, before the node's first start)
    # issues the agent its bundle
    bundle = tmp_path / "agent.pem"
    subprocess.run([sys.executable, "-m", "nimbostack.main", "agent-credentials", "--data-dir",
                    str(tmp_path / "data"), "--address", f"127.0.0.1:{port}", "--out", str(bundle)], check=True)
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115 - the child writes it
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nimbostack.main",
            "agent",
            "--driver",
            "simulator",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--state-dir",
            str(tmp_path / "agent-state"),
            "--credentials",
            str(bundle),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        _wait_until("the simulator agent listens", lambda: _listens(port), 30, proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Storm:
    """``VMS`` CreateVmInstance POSTs at once from a background thread; nobody polls their jobs."""

    def __init__(self, url: str, session: str, env: dict[str, Any]) -> None:
        self.url, self.session, self.env = url, session, env
        self.accepted: list[str] = []  # job uuids answered Processing
        self.names: dict[str, str] = {}  # job uuid -> the name of the VM it creates
        self.done: list[dict[str, Any]] = []  # replies answered at once (Done)
        self.lost = 0  # POSTs without an answer (the node died under them)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._fire()), daemon=True)

    async def _fire(self) -> None:
        name = spec.messages()["CreateVmInstance"].full_name
        limits = httpx.Limits(max_connections=VMS, max_keepalive_connections=VMS)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0, connect=10.0)) as http:

            async def one(i: int) -> None:
                body = {
                    name: {
                        "name": f"storm-{i}",
                        "imageUuid": self.env["image"]["uuid"],
                        "instanceOfferingUuid": self.env["offering"]["uuid"],
                        "l3NetworkUuids": [self.env["l3"]["uuid"]],
                        "session": {"uuid": self.session},
                    }
                }
                try:
                    answer = (await http.post(f"{self.url}/zstack/api", json=body)).json()
                except (httpx.HTTPError, ValueError):
                    with self.lock:
                        self.lost += 1
                    return
                with self.lock:
                    if answer["state"] == "Processing":
                        self.accepted.append(answer["uuid"])
                        self.names[answer["uuid"]] = f"storm-{i}"
                    else:
                        (reply,) = json.loads(answer["result"]).values()
                        self.done.append(reply)

            await asyncio.gather(*(one(i) for i in range(VMS)))

    def count_accepted(self) -> int:
        with self.lock:
            return len(self.accepted)


def _db_rows(db: Path, sql: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _running(db: Path) -> int:
    return _db_rows(db, "SELECT COUNT(*) AS n FROM vm_instance WHERE state = 'Running'")[0]["n"]


def test_sigkill_during_200_creates_recovers_to_a_consistent_state(tmp_path: Path, agent_port: int) -> None:
    data_dir = tmp_path / "data"
    node = Node(data_dir, tmp_path, agent_port)
    try:
        node.start()
        api = Api(node.url)
        api.login()
        env = build_zone(api, hosts=4)

        db = data_dir / "nimbostack.db"
        storm = Storm(node.url, api.session or "", env)
        storm.thread.start()
        # kill the node once it has accepted a quarter of the calls and finished a few of them, so
        # that VMs are caught at every step of their creation flow
        _wait_until(
            f"{KILL_AFTER} CreateVmInstance jobs accepted and {RUNNING_BEFORE_KILL} VMs Running",
            lambda: storm.count_accepted() >= KILL_AFTER and _running(db) >= RUNNING_BEFORE_KILL,
            40,
            node.proc,
        )
        node.kill()
        storm.thread.join(40)
        assert not storm.thread.is_alive(), "the clients of the killed node did not give up"
        assert len(storm.accepted) >= KILL_AFTER, f"only {len(storm.accepted)} jobs were accepted before the kill"

        node.start()  # same data dir, same port: the database's part of recovery runs before it answers
        api = Api(node.url)
        api.login()
        # the hosts' part runs in the background: each host is Connecting until its agent answered
        _wait_until(
            "every host connected again",
            lambda: not _db_rows(db, "SELECT uuid FROM host WHERE status = 'Connecting'"),
            30,
            node.proc,
        )

        # every job the dead node accepted has an answer now: Done, a success or an error
        restarted = 0
        answered: dict[str, bool] = {}  # VM name -> whether its job answered a success
        for job in storm.accepted:
            answer: dict[str, Any] = {}

            def done(job: str = job) -> bool:
                nonlocal answer
                answer = httpx.get(f"{node.url}/zstack/api/result/{job}", timeout=10).json()
                return answer.get("state") == "Done"

            _wait_until(f"job {job} answers Done after the restart", done, 5)
            (reply,) = json.loads(answer["result"]).values()
            assert reply["success"] or reply.get("error", {}).get("code"), reply
            answered[storm.names[job]] = bool(reply["success"])
            restarted += (not reply["success"]) and reply["error"]["code"] == MANAGEMENT_RESTARTED
        assert restarted, "no accepted job was cut short by the kill: the test did not exercise recovery"

        hosts = {h["uuid"]: h for h in api.query("QueryHost")}
        vms = api.query("QueryVmInstance", limit=VMS + 10)
        by_uuid = {vm["uuid"]: vm for vm in vms}
        print(  # shown with -s: how the kill fell
            f"accepted {len(storm.accepted)}, answered at once {len(storm.done)}, unanswered {storm.lost}, "
            f"cut short {restarted}; after recovery {len(vms)} VMs: "
            f"{sorted({vm['state'] for vm in vms})}"
        )

        # no VM is left half-way: it exists Running, or Unknown only where its host is not connected
        for vm in vms:
            assert vm["state"] not in TRANSITIONAL, f"VM {vm['uuid']} is stuck {vm['state']}"
            if vm["state"] == "Unknown":
                assert hosts.get(vm["hostUuid"], {}).get("status") != "Connected", vm
            else:
                assert vm["state"] == "Running", f"VM {vm['uuid']} is {vm['state']} after recovery"
        # an answer matches the outcome: a job that answered an error left no VM behind (a client
        # that retries makes no duplicate), and one that answered a success has its VM
        names = {vm["name"] for vm in vms}
        left = sorted(n for n, ok in answered.items() if not ok and n in names)
        assert not left, f"{len(left)} VMs exist whose creation answered an error, e.g. {left[:3]}"
        missing = sorted(n for n, ok in answered.items() if ok and n not in names)
        assert not missing, f"{len(missing)} creations answered a success but their VM is gone, e.g. {missing[:3]}"
        # what was answered a success before the kill survived it
        for reply in storm.done:
            if reply["success"]:
                vm = by_uuid.get(reply["inventory"]["uuid"])
                assert vm is not None and vm["state"] == "Running", reply["inventory"]["uuid"]

        # every IP a NIC took belongs to an existing NIC, and every NIC's IP exists
        stray_ips = _db_rows(
            db,
            "SELECT uuid, ip FROM used_ip WHERE usedFor = 'VmNic' "
            "AND uuid NOT IN (SELECT usedIpUuid FROM vm_nic WHERE usedIpUuid IS NOT NULL)",
        )
        assert not stray_ips, f"{len(stray_ips)} IPs held by no NIC, e.g. {dict(stray_ips[0])}"
        missing_ips = _db_rows(
            db,
            "SELECT uuid, ip FROM vm_nic WHERE usedIpUuid IS NULL OR usedIpUuid NOT IN (SELECT uuid FROM used_ip)",
        )
        assert not missing_ips, f"{len(missing_ips)} NICs without their IP, e.g. {dict(missing_ips[0])}"
        orphan_nics = _db_rows(db, "SELECT uuid FROM vm_nic WHERE vmInstanceUuid NOT IN (SELECT uuid FROM vm_instance)")
        assert not orphan_nics, f"{len(orphan_nics)} NICs of VMs that do not exist"
        orphan_volumes = _db_rows(
            db,
            "SELECT uuid FROM volume WHERE vmInstanceUuid IS NOT NULL "
            "AND vmInstanceUuid NOT IN (SELECT uuid FROM vm_instance)",
        )
        assert not orphan_volumes, f"{len(orphan_volumes)} volumes of VMs that do not exist"
        ips = [r["ip"] for r in _db_rows(db, "SELECT ip FROM vm_nic")]
        assert len(ips) == len(set(ips)), "two NICs share an IP"

        # each host has exactly what its VMs do not hold
        holding = _db_rows(
            db,
            f"SELECT hostUuid, SUM(cpuNum * cpuSpeed) AS cpu, SUM(memorySize) AS mem FROM vm_instance "
            f"WHERE hostUuid IS NOT NULL AND state IN ({','.join(repr(s) for s in HOLDS_CAPACITY)}) "
            f"GROUP BY hostUuid",
        )
        held = {r["hostUuid"]: (r["cpu"], r["mem"]) for r in holding}
        for row in _db_rows(
            db,
            "SELECT uuid, totalCpuCapacity, availableCpuCapacity, totalMemoryCapacity, availableMemoryCapacity "
            "FROM host",
        ):
            cpu, mem = held.get(row["uuid"], (0, 0))
            assert row["availableCpuCapacity"] == row["totalCpuCapacity"] - cpu, dict(row)
            assert row["availableMemoryCapacity"] == row["totalMemoryCapacity"] - mem, dict(row)
            assert hosts[row["uuid"]]["availableMemoryCapacity"] == row["availableMemoryCapacity"]
        assert sum(cpu for cpu, _ in held.values()) == sum(
            vm["cpuNum"] * vm["cpuSpeed"] for vm in vms if vm["state"] in HOLDS_CAPACITY
        )
    finally:
        node.stop()


HOSTS = 200
CONNECT_DELAY = 8.0  # seconds the one slow host's agent takes to answer /host/connect


def _agent_call(data_dir: Path, agent_port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A command to the simulator agent as the management node sends it (its certificate)."""
    tls = pki.Credentials(data_dir / "pki" / "node.pem").client_context()
    reply = httpx.post(f"https://127.0.0.1:{agent_port}{path}", json=body, timeout=30, verify=tls).json()
    assert reply.get("success"), reply
    return reply  # type: ignore[no-any-return]


def test_a_restarted_node_serves_while_its_hosts_reconnect(tmp_path: Path, agent_port: int) -> None:
    data_dir = tmp_path / "data"
    node = Node(data_dir, tmp_path, agent_port)
    try:
        node.start()
        api = Api(node.url)
        api.login()
        env = build_zone(api, hosts=HOSTS)
        slow = env["hosts"][HOSTS // 2]["uuid"]
        vm = api.call(
            "CreateVmInstance",
            name="on-the-slow-host",
            imageUuid=env["image"]["uuid"],
            instanceOfferingUuid=env["offering"]["uuid"],
            l3NetworkUuids=[env["l3"]["uuid"]],
            hostUuid=slow,
        )["inventory"]
        (ps,) = api.query("QueryPrimaryStorage")
        node.stop()
        # the slow host's agent answers the restarted node's first connect late (once: its pings are quick)
        _agent_call(data_dir, agent_port, "/simulator/fault",
                    {"hostUuid": slow, "path": "/host/connect", "delay": CONNECT_DELAY, "times": 1})

        node.start()
        api = Api(node.url)
        api.login()
        statuses = {h["uuid"]: h["status"] for h in api.query("QueryHost", fields=["uuid", "status"], limit=HOSTS)}
        assert len(statuses) == HOSTS
        assert statuses[slow] == "Connecting", "the node answered only after the slow host connected"
        # a command for the host fails at once with ZStack's "host is not connected", never waits for it
        err = api.fails("StopVmInstance", uuid=vm["uuid"])
        assert err["code"] == "HOST.1002" and "Connecting" in err["details"], err
        assert api.query("QueryHost", ("uuid", "=", slow))[0]["status"] == "Connecting"

        _wait_until(
            f"all {HOSTS} hosts Connected",
            lambda: len(api.query("QueryHost", ("status", "=", "Connected"), fields=["uuid"], limit=HOSTS)) == HOSTS,
            60,
            node.proc,
        )
        (after,) = api.query("QueryVmInstance", ("uuid", "=", vm["uuid"]))
        assert after["state"] == "Running" and after["hostUuid"] == slow
        # the storage's figures are what they were: each reconnect moved them by its own share's change
        (ps_after,) = api.query("QueryPrimaryStorage")
        figures = ("totalCapacity", "availableCapacity", "totalPhysicalCapacity", "availablePhysicalCapacity")
        assert {k: ps_after[k] for k in figures} == {k: ps[k] for k in figures}
        assert api.call("StopVmInstance", uuid=vm["uuid"])["inventory"]["state"] == "Stopped"
    finally:
        node.stop()


def test_an_orphaned_creation_answers_what_became_of_its_vm(tmp_path: Path) -> None:
    """The two ways a node can die around a creation's end, made exactly: after the VM's last step
    but before the job's answer (the job must answer a success with that VM), and before the last
    step (the job answers an error, so the VM must be gone)."""
    from sqlalchemy import text

    from tests.conftest import Running

    data = tmp_path / "data"
    first = Running(data)
    try:
        api = Api(first.url)
        api.login()
        env = build_zone(api)
        params = {"imageUuid": env["image"]["uuid"], "instanceOfferingUuid": env["offering"]["uuid"],
                  "l3NetworkUuids": [env["l3"]["uuid"]]}
        finished = api.call("CreateVmInstance", name="finished", **params)["inventory"]
        cut = api.call("CreateVmInstance", name="cut", **params)["inventory"]

        async def as_if_killed() -> list[str]:
            async with first.platform.db.tx() as s:
                jobs = {}
                for vm in (finished, cut):
                    jobs[vm["uuid"]] = (await s.execute(
                        text('SELECT uuid FROM job WHERE "resourceUuid" = :vm'), {"vm": vm["uuid"]})).scalar_one()
                # both jobs unanswered; "cut" is where a kill mid-start leaves a VM
                await s.execute(text("UPDATE job SET state = 'Processing', result = NULL"))
                await s.execute(text("UPDATE vm_instance SET state = 'Starting', \"lastHostUuid\" = NULL "
                                     "WHERE uuid = :vm"), {"vm": cut["uuid"]})
                return [jobs[finished["uuid"]], jobs[cut["uuid"]]]

        finished_job, cut_job = first.run(as_if_killed())
    finally:
        first.stop()
    second = Running(data, port=first.port, agent_port=first.agent_port)
    try:
        api = Api(second.url)
        api.login()

        def answer(job: str) -> dict[str, Any]:
            body = httpx.get(f"{second.url}/zstack/api/result/{job}", timeout=10).json()
            assert body["state"] == "Done", body
            (reply,) = json.loads(body["result"]).values()
            return reply  # type: ignore[no-any-return]

        ok = answer(finished_job)
        assert ok["success"] and ok["inventory"]["uuid"] == finished["uuid"], ok
        failed = answer(cut_job)
        assert not failed["success"] and failed["error"]["code"] == MANAGEMENT_RESTARTED
        wait_for(lambda: not api.query("QueryVmInstance", ("uuid", "=", cut["uuid"])), 30, "the cut creation undone")
        assert api.query("QueryVmInstance", ("uuid", "=", finished["uuid"]))
        wait_for(lambda: cut["uuid"] not in second.agent_call("/simulator/state", {"hostUuid": cut["hostUuid"]})[
            "domains"], 30, "the cut VM's domain destroyed")
        assert not api.query("QueryVolume", ("vmInstanceUuid", "=", cut["uuid"]))
    finally:
        second.stop()
