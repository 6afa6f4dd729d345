"""Shared fixtures: a real management node and a simulator agent on loopback ports, driven over
HTTP exactly as any client would. ``NIMBOSTACK_TEST_DB`` (a PostgreSQL URL) runs the same tests
against PostgreSQL instead of an SQLite file."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Any, timeout: float, what: str, every: float = 0.2) -> Any:
    """The first true value of ``predicate()``, asked every ``every`` s; fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class ApiError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(json.dumps(error))
        self.code = error.get("code")
        self.error = error


class Api:
    """A small ZStack wire client: call("CreateZone", name="z") → the reply body."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = httpx.Client(timeout=120)
        self.session: str | None = None

    def raw(self, name: str, params: dict[str, Any], session: bool = True) -> dict[str, Any]:
        from nimbostack.core import spec

        full = spec.messages()[name].full_name if name in spec.messages() else name
        body = dict(params)
        if session and self.session:
            body["session"] = {"uuid": self.session}
        r = self.http.post(f"{self.base}/zstack/api", json={full: body})
        assert r.status_code == 200, r.text
        answer = r.json()
        while answer["state"] == "Processing":
            time.sleep(0.02)
            answer = self.http.get(f"{self.base}/zstack/api/result/{answer['uuid']}").json()
        (reply,) = json.loads(answer["result"]).values()
        return reply

    def call(self, name: str, /, **params: Any) -> dict[str, Any]:
        reply = self.raw(name, params)
        if not reply["success"]:
            raise ApiError(reply["error"])
        return reply

    def fails(self, name: str, /, **params: Any) -> dict[str, Any]:
        reply = self.raw(name, params)
        assert not reply["success"], f"{name} should have failed: {reply}"
        return reply["error"]

    def login(self, name: str = "admin", password: str = "password") -> str:
        reply = self.call("LogInByAccount", accountName=name, password=hashlib.sha512(password.encode()).hexdigest())
        self.session = reply["inventory"]["uuid"]
        return self.session

    def query(self, name: str, /, *conds: tuple[str, str, Any], **params: Any) -> list[dict[str, Any]]:
        conditions = [{"name": n, "op": op, "value": v} for n, op, v in conds]
        return self.call(name, conditions=conditions, **params)["inventories"]


class Running:
    """A management node + simulator agent in a background thread's event loop."""

    def __init__(
        self,
        data_dir: Path,
        db_url: str | None = None,
        quick_wait: float = 0.2,
        port: int | None = None,
        agent_port: int | None = None,
        background: bool = False,
        driver: str = "simulator",
        listen: str = "127.0.0.1",
    ) -> None:
        """``port``/``agent_port`` reuse a stopped node's ports (a restart on the same data dir);
        ``background`` runs the pings, the expunger and the GC poll; ``driver`` "libvirt" makes the
        agent a real KVM host agent; ``listen`` is the management node's address (agents on other
        machines push their events there)."""
        import uvicorn

        from nimbostack.api.app import create_app
        from nimbostack.core.platform import Settings
        from nimbostack.db.engine import sqlite_url
        from nimbostack.main import _agent_app

        self.db_url = db_url
        self.port, self.agent_port = port or free_port(), agent_port or free_port()
        settings = Settings(
            data_dir=data_dir,
            db_url=db_url or sqlite_url(data_dir),
            port=self.port,
            management_url=f"http://{listen}:{self.port}",
            simulator_agent_url=f"http://127.0.0.1:{self.agent_port}",
            quick_wait=quick_wait,
            background=background,
        )
        data_dir.mkdir(parents=True, exist_ok=True)
        self.app = create_app(settings)
        self.servers = [
            uvicorn.Server(
                uvicorn.Config(
                    _agent_app(driver, "auto", "127.0.0.1", str(data_dir / "agent")),
                    host="127.0.0.1",
                    port=self.agent_port,
                    log_level="warning",
                )
            ),
            uvicorn.Server(uvicorn.Config(self.app, host=listen, port=self.port, log_level="warning")),
        ]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not all(s.started for s in self.servers):
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the management node did not start")
            time.sleep(0.05)
        self.url = f"http://{listen}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        for s in self.servers:
            s.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.loop.run_until_complete(asyncio.gather(*(s.serve() for s in self.servers)))

    @property
    def platform(self) -> Any:
        return self.app.wire.platform

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def stop(self) -> None:
        for s in reversed(self.servers):
            s.should_exit = True
        self.thread.join(30)


def _fresh_postgres(url: str) -> str:
    """A new empty database per test on the server of ``url`` (postgresql+asyncpg://...)."""
    import uuid

    import asyncpg

    name = f"nimbo_test_{uuid.uuid4().hex[:10]}"
    server = url.replace("postgresql+asyncpg://", "postgresql://")

    async def create() -> None:
        conn = await asyncpg.connect(server)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Running]:
    db = os.environ.get("NIMBOSTACK_TEST_DB")
    running = Running(tmp_path / "data", _fresh_postgres(db) if db else None)
    yield running
    running.stop()


@pytest.fixture
def api(node: Running) -> Api:
    client = Api(node.url)
    client.login()
    return client


def build_zone(
    api: Api,
    hosts: int = 1,
    cpu: int = 8 * 2600,
    memory: int = 16 << 30,
    cidr_start: str = "198.18.0.10",
    cidr_end: str = "198.18.3.250",
) -> dict[str, Any]:
    """Zone, cluster, simulated hosts, local storage, a flat L3 with DHCP, an image and offerings."""
    zone = api.call("CreateZone", name="zone1")["inventory"]
    cluster = api.call("CreateCluster", name="cluster1", zoneUuid=zone["uuid"], hypervisorType="Simulator")["inventory"]
    ps = api.call("AddLocalPrimaryStorage", name="ps", url="/nimbo/ps", zoneUuid=zone["uuid"])["inventory"]
    api.call("AttachPrimaryStorageToCluster", primaryStorageUuid=ps["uuid"], clusterUuid=cluster["uuid"])
    host_list = [
        api.call(
            "AddSimulatorHost",
            name=f"host{i}",
            managementIp=f"10.0.{i // 250}.{i % 250 + 1}",
            clusterUuid=cluster["uuid"],
            cpuCapacity=cpu,
            memoryCapacity=memory,
        )["inventory"]
        for i in range(hosts)
    ]
    bs = api.call("AddSimulatorBackupStorage", name="bs", url="/nimbo/bs")["inventory"]
    api.call("AttachBackupStorageToZone", backupStorageUuid=bs["uuid"], zoneUuid=zone["uuid"])
    image = api.call(
        "AddImage",
        name="tiny",
        url="http://example.invalid/tiny.qcow2",
        format="qcow2",
        backupStorageUuids=[bs["uuid"]],
    )["inventory"]
    l2 = api.call("CreateL2NoVlanNetwork", name="l2", zoneUuid=zone["uuid"], physicalInterface="eth0")["inventory"]
    api.call("AttachL2NetworkToCluster", l2NetworkUuid=l2["uuid"], clusterUuid=cluster["uuid"])
    l3 = api.call("CreateL3Network", name="l3", l2NetworkUuid=l2["uuid"])["inventory"]
    api.call(
        "AddIpRange",
        l3NetworkUuid=l3["uuid"],
        name="r1",
        startIp=cidr_start,
        endIp=cidr_end,
        netmask="255.255.252.0",
        gateway="198.18.0.1",
    )
    api.call("AddDnsToL3Network", l3NetworkUuid=l3["uuid"], dns="198.18.0.1")
    flat = api.query("QueryNetworkServiceProvider", ("type", "=", "Flat"))[0]
    api.call(
        "AttachNetworkServiceProviderToL2Network", l2NetworkUuid=l2["uuid"], networkServiceProviderUuid=flat["uuid"]
    )
    api.call(
        "AttachNetworkServiceToL3Network",
        l3NetworkUuid=l3["uuid"],
        networkServices={flat["uuid"]: ["DHCP", "Userdata"]},
    )
    offering = api.call("CreateInstanceOffering", name="small", cpuNum=1, cpuSpeed=100, memorySize=128 << 20)[
        "inventory"
    ]
    disk = api.call("CreateDiskOffering", name="d1", diskSize=1 << 30)["inventory"]
    return {
        "zone": zone,
        "cluster": cluster,
        "ps": ps,
        "hosts": host_list,
        "bs": bs,
        "image": image,
        "l2": l2,
        "l3": l3,
        "offering": offering,
        "disk": disk,
        "flat": flat,
    }


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With NIMBOSTACK_NO_SKIPS=1 (set by .ci/run) a skipped test fails the run: every skip says
    what is missing, and CI installs all of it, so a skip there is a broken setup, not a pass."""
    if os.environ.get("NIMBOSTACK_NO_SKIPS") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reporter.write_line(f"NIMBOSTACK_NO_SKIPS: {len(skipped)} test(s) skipped; CI must run them all", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
