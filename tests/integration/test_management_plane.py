"""The management plane (issue 13 item 12): the management nodes on the database and their
heartbeats (QueryManagementNode, IsReadyToGo), GetVersion and GetHypervisorTypes."""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timedelta
from importlib.metadata import version
from pathlib import Path

import pytest

from nimbostack.cli import main as cli
from nimbostack.core import management
from nimbostack.db import models as m
from tests.conftest import Api, Running


def _account(api: Api, node: Running, name: str) -> Api:
    api.call("CreateAccount", name=name, password=hashlib.sha512(name.encode()).hexdigest())
    client = Api(node.url)
    client.login(name, name)
    return client


def _insert_node(node: Running, uuid: str, beat_ago: timedelta) -> None:
    """Another management node's row, as that node would have written it ``beat_ago`` ago."""

    async def insert() -> None:
        when = datetime.utcnow() - beat_ago
        async with node.platform.db.tx() as s:
            s.add(m.ManagementNode(uuid=uuid, hostName="192.0.2.7", joinDate=when, heartBeat=when))

    node.run(insert())


def test_query_management_node_shows_this_node_and_its_heartbeat(node: Running, api: Api) -> None:
    (row,) = api.query("QueryManagementNode")
    assert sorted(row) == ["heartBeat", "hostName", "joinDate", "uuid"]
    assert row["uuid"] == node.platform.node_uuid and row["hostName"] == "127.0.0.1"
    assert row["joinDate"] == row["heartBeat"]
    # the query language works on it like on any resource
    assert api.query("QueryManagementNode", ("hostName", "=", "127.0.0.1"))[0]["uuid"] == row["uuid"]
    assert api.query("QueryManagementNode", ("uuid", "!=", row["uuid"])) == []
    assert api.call("QueryManagementNode", conditions=[], count=True)["total"] == 1
    assert api.fails("QueryManagementNode", conditions=[{"name": "ip", "op": "=", "value": "x"}])["code"] == "SYS.1007"

    time.sleep(1.1)  # dates are to the second
    node.run(management.beat(node.platform))
    (after,) = api.query("QueryManagementNode")
    assert after["joinDate"] == row["joinDate"] and after["heartBeat"] != row["heartBeat"]

    tenant = _account(api, node, "mn-tenant")
    assert tenant.fails("QueryManagementNode", conditions=[])["code"] == "ID.1003"


def test_is_ready_to_go_and_nodes_that_stop_beating(node: Running, api: Api) -> None:
    me = node.platform.node_uuid
    anonymous = Api(node.url)  # no session: ZStack's tools ask before they log in
    assert anonymous.call("IsReadyToGo")["managementNodeId"] == me
    assert anonymous.call("IsReadyToGo", managementNodeId=me)["managementNodeId"] == me

    alive, dead = "a" * 32, "d" * 32
    _insert_node(node, alive, timedelta(seconds=1))
    _insert_node(node, dead, management.HEARTBEAT_DEAD_AFTER + timedelta(seconds=5))
    assert {r["uuid"] for r in api.query("QueryManagementNode")} == {me, alive, dead}
    assert api.call("IsReadyToGo", managementNodeId=alive)["managementNodeId"] == alive
    err = api.fails("IsReadyToGo", managementNodeId=dead)
    assert err["code"] == "SYS.1005" and "not ready" in err["details"]
    assert api.fails("IsReadyToGo", managementNodeId="f" * 32)["code"] == "SYS.1006"

    node.run(management.beat(node.platform))  # a beating node removes those that stopped
    assert {r["uuid"] for r in api.query("QueryManagementNode")} == {me, alive}
    assert api.fails("IsReadyToGo", managementNodeId=dead)["code"] == "SYS.1006"


def test_a_stopped_node_leaves_and_a_restarted_one_joins(tmp_path: Path, node: Running) -> None:
    api = Api(node.url)
    api.login()
    first = api.query("QueryManagementNode")[0]["uuid"]
    node.stop()
    again = Running(tmp_path / "data", node.db_url, port=node.port, agent_port=node.agent_port)
    try:
        api = Api(again.url)
        api.login()
        (row,) = api.query("QueryManagementNode")  # the stopped node removed its row
        assert row["uuid"] == again.platform.node_uuid != first
    finally:
        again.stop()


def test_get_version_needs_no_session_and_the_shell_has_it(
    node: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert Api(node.url).call("GetVersion")["version"] == version("nimbostack")
    monkeypatch.setenv("NIMBOSTACK_CLI_HOME", str(tmp_path / "cli"))
    capsys.readouterr()
    assert cli(["--port", str(node.port), "GetVersion"]) == 0
    assert version("nimbostack") in capsys.readouterr().out


def test_hypervisor_types_are_those_hosts_can_be_added_as(node: Running, api: Api) -> None:
    types = api.call("GetHypervisorTypes")["hypervisorTypes"]
    assert sorted(types) == ["KVM", "Simulator"]
    zone = api.call("CreateZone", name="z")["inventory"]["uuid"]
    for t in types:
        cluster = api.call("CreateCluster", name=t, zoneUuid=zone, hypervisorType=t)["inventory"]
        assert cluster["hypervisorType"] == t
    tenant = _account(api, node, "hv-tenant")
    assert tenant.call("GetHypervisorTypes")["hypervisorTypes"] == types


def test_type_listings_name_what_the_apis_create(node: Running, api: Api) -> None:
    """GetPrimaryStorageTypes, GetBackupStorageTypes, GetL2NetworkTypes, GetNetworkServiceTypes:
    what resources can be made of, each listed type accepted where it is used."""
    ps_types = api.call("GetPrimaryStorageTypes")["primaryStorageTypes"]
    assert {"LocalStorage", "SharedMountPoint"} <= set(ps_types)
    assert sorted(api.call("GetBackupStorageTypes")["backupStorageTypes"]) == ["Sftp", "SimulatorBackupStorage"]
    l2_types = api.call("GetL2NetworkTypes")["l2NetworkTypes"]
    assert sorted(l2_types) == ["L2NoVlanNetwork", "L2VlanNetwork"]

    zone = api.call("CreateZone", name="z")["inventory"]["uuid"]
    made = [api.call("CreateL2NoVlanNetwork", name="a", zoneUuid=zone, physicalInterface="eth0")["inventory"],
            api.call("CreateL2VlanNetwork", name="b", zoneUuid=zone, physicalInterface="eth0", vlan=10)["inventory"]]
    assert sorted(r["type"] for r in made) == sorted(l2_types)
    ps = api.call("AddLocalPrimaryStorage", name="ps", url="/nimbo/ps", zoneUuid=zone)["inventory"]
    assert ps["type"] in ps_types
    bs = api.call("AddSimulatorBackupStorage", name="bs", url="/nimbo/bs")["inventory"]
    assert bs["type"] in api.call("GetBackupStorageTypes")["backupStorageTypes"]

    services = api.call("GetNetworkServiceTypes")["serviceAndProviderTypes"]
    for provider in api.query("QueryNetworkServiceProvider"):
        for service in provider["networkServiceTypes"]:
            assert provider["type"] in services[service]
    assert "Flat" in services["DHCP"] and "VirtualRouter" in services["DHCP"]
