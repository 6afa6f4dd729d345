"""Shared fixtures: a real management node and a simulator agent on loopback ports, driven over
HTTP exactly as any client would. ``NIMBOSTACK_TEST_DB`` (a PostgreSQL URL) runs the same tests
against PostgreSQL instead of an SQLite file."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nimbostack.harness import Api, ApiError, Running, free_port, wait_for

__all__ = ["Api", "ApiError", "Running", "free_port", "wait_for"]


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
