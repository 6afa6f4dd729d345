"""Security groups on the management plane (simulator): the 14 API messages, their errors and
tenancy, and what each host's agent is asked to enforce (``SgService.simulated``: per simulated
host, NIC -> its ingress and egress rules)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from nimbostack.cli import main as cli
from tests.conftest import Api, Running, build_zone
from tests.integration.test_flat_network import fault, make_vm

SSH = {"type": "Ingress", "protocol": "TCP", "startPort": 22, "endPort": 22, "allowedCidr": "198.18.0.0/24"}


def sg_state(node: Running, host_uuid: str) -> dict[str, Any]:
    svc = node.agent_server.agent.extensions.get("security_group")
    return {} if svc is None else svc.simulated.get(host_uuid, {})


def with_sg_service(api: Api, env: dict[str, Any]) -> dict[str, Any]:
    """The zone's L3 network with the SecurityGroup service, from the SecurityGroup provider."""
    (sgp,) = api.query("QueryNetworkServiceProvider", ("type", "=", "SecurityGroup"))
    assert sgp["networkServiceTypes"] == ["SecurityGroup"]
    api.call("AttachNetworkServiceProviderToL2Network", l2NetworkUuid=env["l2"]["uuid"],
             networkServiceProviderUuid=sgp["uuid"])
    api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=env["l3"]["uuid"],
             networkServices={sgp["uuid"]: ["SecurityGroup"]})
    return sgp


def group_on_l3(api: Api, env: dict[str, Any], name: str = "web") -> dict[str, Any]:
    sg = api.call("CreateSecurityGroup", name=name, description="d")["inventory"]
    api.call("AttachSecurityGroupToL3Network", securityGroupUuid=sg["uuid"], l3NetworkUuid=env["l3"]["uuid"])
    return sg


def test_rules_and_members_reach_the_host_and_go_again(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=2)
    with_sg_service(api, env)
    sg = group_on_l3(api, env)
    assert sg["state"] == "Enabled" and sg["rules"] == [] and sg["internalId"] >= 1
    vm = make_vm(api, env)
    other = make_vm(api, env, name="other")
    nic, host = vm["vmNics"][0]["uuid"], vm["hostUuid"]
    # a group without members: no host hears of it
    out = api.call("AddSecurityGroupRule", securityGroupUuid=sg["uuid"], rules=[SSH])["inventory"]
    (rule,) = out["rules"]
    assert {k: rule[k] for k in SSH} == SSH and rule["state"] == "Enabled" and rule["securityGroupUuid"] == sg["uuid"]
    assert nic not in sg_state(node, host)
    (candidate,) = [n for n in api.call("GetCandidateVmNicForSecurityGroup", securityGroupUuid=sg["uuid"])[
        "inventories"] if n["uuid"] == nic]
    assert candidate["vmInstanceUuid"] == vm["uuid"]
    api.call("AddVmNicToSecurityGroup", securityGroupUuid=sg["uuid"], vmNicUuids=[nic])
    state = sg_state(node, host)[nic]
    assert state["vmUuid"] == vm["uuid"] and state["egress"] == []
    assert state["ingress"] == [{"protocol": "TCP", "start": 22, "end": 22, "cidr": "198.18.0.0/24"}]
    assert other["vmNics"][0]["uuid"] not in sg_state(node, other["hostUuid"])
    assert nic not in {n["uuid"] for n in api.call("GetCandidateVmNicForSecurityGroup",
                                                   securityGroupUuid=sg["uuid"])["inventories"]}
    # queries, nested fields included
    (ref,) = api.query("QueryVmNicInSecurityGroup", ("securityGroupUuid", "=", sg["uuid"]))
    assert ref["vmNicUuid"] == nic and ref["vmInstanceUuid"] == vm["uuid"]
    assert [g["uuid"] for g in api.query("QuerySecurityGroup", ("rules.protocol", "=", "TCP"))] == [sg["uuid"]]
    assert api.query("QuerySecurityGroup", ("rules.protocol", "=", "UDP")) == []
    (got,) = api.query("QuerySecurityGroupRule", ("securityGroup.name", "=", "web"))
    assert got["uuid"] == rule["uuid"]
    (g,) = api.query("QuerySecurityGroup", ("uuid", "=", sg["uuid"]))
    assert g["attachedL3NetworkUuids"] == [env["l3"]["uuid"]]
    # an egress rule and an ICMP one: live, one push
    egress = {"type": "Egress", "protocol": "UDP", "startPort": 53, "endPort": 53, "allowedCidr": "198.18.0.1/32"}
    ping = {"type": "Ingress", "protocol": "ICMP", "startPort": 8, "endPort": -1, "allowedCidr": "0.0.0.0/0"}
    api.call("AddSecurityGroupRule", securityGroupUuid=sg["uuid"], rules=[egress, ping])
    state = sg_state(node, host)[nic]
    assert state["egress"] == [{"protocol": "UDP", "start": 53, "end": 53, "cidr": "198.18.0.1/32"}]
    assert {"protocol": "ICMP", "start": 8, "end": -1, "cidr": "0.0.0.0/0"} in state["ingress"]
    api.call("DeleteSecurityGroupRule", ruleUuids=[rule["uuid"]])
    assert all(r["start"] != 22 for r in sg_state(node, host)[nic]["ingress"])
    # disabled: the group filters nothing; enabled again: back
    api.call("ChangeSecurityGroupState", uuid=sg["uuid"], stateEvent="disable")
    assert nic not in sg_state(node, host)
    api.call("ChangeSecurityGroupState", uuid=sg["uuid"], stateEvent="enable")
    assert nic in sg_state(node, host)
    # stop and start: the chains go with the VM and come back before it runs
    api.call("StopVmInstance", uuid=vm["uuid"])
    assert nic not in sg_state(node, host)
    started = api.call("StartVmInstance", uuid=vm["uuid"])["inventory"]
    assert nic in sg_state(node, started["hostUuid"])
    api.call("DeleteVmNicFromSecurityGroup", securityGroupUuid=sg["uuid"], vmNicUuids=[nic])
    assert nic not in sg_state(node, started["hostUuid"])
    assert api.query("QueryVmNicInSecurityGroup", ("securityGroupUuid", "=", sg["uuid"])) == []
    # in again, then the group deleted: nothing left anywhere
    api.call("AddVmNicToSecurityGroup", securityGroupUuid=sg["uuid"], vmNicUuids=[nic])
    api.call("UpdateSecurityGroup", uuid=sg["uuid"], name="renamed")
    assert api.query("QuerySecurityGroup", ("name", "=", "renamed"))[0]["uuid"] == sg["uuid"]
    api.call("DeleteSecurityGroup", uuid=sg["uuid"])
    assert nic not in sg_state(node, started["hostUuid"])
    assert api.query("QuerySecurityGroupRule") == [] and api.query("QueryVmNicInSecurityGroup") == []


def test_destroy_detach_and_reconnect(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=1)
    with_sg_service(api, env)
    sg = group_on_l3(api, env)
    api.call("AddSecurityGroupRule", securityGroupUuid=sg["uuid"], rules=[SSH])
    vm = make_vm(api, env)
    nic, host = vm["vmNics"][0]["uuid"], vm["hostUuid"]
    api.call("AddVmNicToSecurityGroup", securityGroupUuid=sg["uuid"], vmNicUuids=[nic])
    # the host forgets (its agent restarted): reconnecting gives it the whole table again
    node.agent_server.agent.extensions["security_group"].simulated.clear()
    api.call("ReconnectHost", uuid=host)
    assert nic in sg_state(node, host)
    # a stale NIC on the host is dropped by the same full push
    node.agent_server.agent.extensions["security_group"].simulated[host]["f" * 32] = {"vmUuid": "e" * 32}
    api.call("ReconnectHost", uuid=host)
    assert set(sg_state(node, host)) == {nic}
    # detaching the group from the L3 network takes the L3's NICs out of it
    api.call("DetachSecurityGroupFromL3Network", securityGroupUuid=sg["uuid"], l3NetworkUuid=env["l3"]["uuid"])
    assert nic not in sg_state(node, host)
    assert api.query("QueryVmNicInSecurityGroup") == []
    api.call("AttachSecurityGroupToL3Network", securityGroupUuid=sg["uuid"], l3NetworkUuid=env["l3"]["uuid"])
    api.call("AddVmNicToSecurityGroup", securityGroupUuid=sg["uuid"], vmNicUuids=[nic])
    api.call("DestroyVmInstance", uuid=vm["uuid"])
    assert nic not in sg_state(node, host)
    # a running VM that loses a filtered NIC loses its chains
    two = make_vm(api, env, name="two")
    l3b = api.call("CreateL3Network", name="b", l2NetworkUuid=env["l2"]["uuid"])["inventory"]
    api.call("AddIpRange", l3NetworkUuid=l3b["uuid"], name="r", startIp="198.19.4.10", endIp="198.19.4.20",
             netmask="255.255.255.0", gateway="198.19.4.1")
    api.call("AttachL3NetworkToVm", vmInstanceUuid=two["uuid"], l3NetworkUuid=l3b["uuid"])
    first = two["vmNics"][0]["uuid"]
    api.call("AddVmNicToSecurityGroup", securityGroupUuid=sg["uuid"], vmNicUuids=[first])
    assert first in sg_state(node, two["hostUuid"])
    api.call("DetachL3NetworkFromVm", vmNicUuid=first)
    assert first not in sg_state(node, two["hostUuid"])
    assert api.query("QueryVmNicInSecurityGroup") == []


def test_the_service_is_needed_and_bad_rules_get_their_codes(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=1)
    sg = api.call("CreateSecurityGroup", name="g")["inventory"]
    err = api.fails("AttachSecurityGroupToL3Network", securityGroupUuid=sg["uuid"], l3NetworkUuid=env["l3"]["uuid"])
    assert err["code"] == "SG.1007" and "SecurityGroup" in err["details"]
    with_sg_service(api, env)
    api.call("AttachSecurityGroupToL3Network", securityGroupUuid=sg["uuid"], l3NetworkUuid=env["l3"]["uuid"])
    err = api.fails("AttachSecurityGroupToL3Network", securityGroupUuid=sg["uuid"], l3NetworkUuid=env["l3"]["uuid"])
    assert err["code"] == "SG.1009"
    bad = {
        "SG.1001": {**SSH, "type": "Inbound"},
        "SG.1002": {**SSH, "protocol": "tcp; drop"},
        "SG.1003": {**SSH, "allowedCidr": "10.0.0.0/33"},
        "SG.1004": {**SSH, "startPort": 90, "endPort": 80},
        "SG.1005": {**SSH, "protocol": "ALL"},
    }
    hostile = ["1.2.3.4/8\n}", "0.0.0.0/0 accept;", "::/0", "198.18.0.0", "'; flush ruleset"]
    for code, rule in bad.items():
        err = api.fails("AddSecurityGroupRule", securityGroupUuid=sg["uuid"], rules=[rule])
        assert err["code"] == code, (code, err)
    for cidr in hostile:
        err = api.fails("AddSecurityGroupRule", securityGroupUuid=sg["uuid"], rules=[{**SSH, "allowedCidr": cidr}])
        assert err["code"] == "SG.1003", (cidr, err)
    for ports in ((0, 70000), (-5, 10), ("x", 10), (True, 10)):
        rule = {**SSH, "startPort": ports[0], "endPort": ports[1]}
        assert api.fails("AddSecurityGroupRule", securityGroupUuid=sg["uuid"], rules=[rule])["code"] == "SG.1004"
    tcp_any = {**SSH, "startPort": -1, "endPort": -1}
    assert api.fails("AddSecurityGroupRule", securityGroupUuid=sg["uuid"], rules=[tcp_any])["code"] == "SG.1005"
    icmp_code_only = {**SSH, "protocol": "ICMP", "startPort": -1, "endPort": 3}
    assert api.fails("AddSecurityGroupRule", securityGroupUuid=sg["uuid"], rules=[icmp_code_only])["code"] == "SG.1005"
    assert api.fails("AddSecurityGroupRule", securityGroupUuid=sg["uuid"], rules=[])["code"] == "SYS.1007"
    for rules in ("nope", [1], [SSH] * 101):
        assert api.fails("AddSecurityGroupRule", securityGroupUuid=sg["uuid"], rules=rules)["code"] == "SG.1011"
    # one bad rule in a call: none of them is added
    assert api.fails("AddSecurityGroupRule", securityGroupUuid=sg["uuid"], rules=[SSH, bad["SG.1003"]])
    assert api.query("QuerySecurityGroupRule") == []
    api.call("AddSecurityGroupRule", securityGroupUuid=sg["uuid"], rules=[SSH])
    assert api.fails("AddSecurityGroupRule", securityGroupUuid=sg["uuid"], rules=[SSH])["code"] == "SG.1006"
    # an ALL rule has no ports; the CIDR is kept as its network
    out = api.call("AddSecurityGroupRule", securityGroupUuid=sg["uuid"],
                   rules=[{"type": "Egress", "protocol": "ALL", "allowedCidr": "198.18.1.7/24"}])["inventory"]
    (everything,) = [r for r in out["rules"] if r["protocol"] == "ALL"]
    assert (everything["startPort"], everything["endPort"], everything["allowedCidr"]) == (-1, -1, "198.18.1.0/24")
    # a NIC of an L3 the group is not attached to
    l3b = api.call("CreateL3Network", name="b", l2NetworkUuid=env["l2"]["uuid"])["inventory"]
    api.call("AddIpRange", l3NetworkUuid=l3b["uuid"], name="r", startIp="198.19.4.10", endIp="198.19.4.20",
             netmask="255.255.255.0", gateway="198.19.4.1")
    vm = api.call("CreateVmInstance", name="b", imageUuid=env["image"]["uuid"],
                  instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[l3b["uuid"]])["inventory"]
    err = api.fails("AddVmNicToSecurityGroup", securityGroupUuid=sg["uuid"], vmNicUuids=[vm["vmNics"][0]["uuid"]])
    assert err["code"] == "SG.1008" and l3b["uuid"] in err["details"]
    assert api.fails("AddVmNicToSecurityGroup", securityGroupUuid=sg["uuid"], vmNicUuids=["0" * 32])["code"] == \
        "SYS.1006"
    err = api.fails("DetachSecurityGroupFromL3Network", securityGroupUuid=sg["uuid"], l3NetworkUuid=l3b["uuid"])
    assert err["code"] == "SG.1010"
    assert api.fails("ChangeSecurityGroupState", uuid=sg["uuid"], stateEvent="off")["code"] == "SYS.1007"
    assert api.fails("DeleteSecurityGroupRule", ruleUuids=["0" * 32])["code"] == "SYS.1006"


def test_a_host_that_fails_rolls_the_change_back(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=1)
    with_sg_service(api, env)
    sg = group_on_l3(api, env)
    vm = make_vm(api, env)
    nic, host = vm["vmNics"][0]["uuid"], vm["hostUuid"]
    api.call("AddVmNicToSecurityGroup", securityGroupUuid=sg["uuid"], vmNicUuids=[nic])
    fault(node, host, "/sg/apply", error="nft exploded", times=1)
    err = api.fails("AddSecurityGroupRule", securityGroupUuid=sg["uuid"], rules=[SSH])
    assert "/sg/apply" in err["details"]
    assert api.query("QuerySecurityGroupRule") == [] and sg_state(node, host)[nic]["ingress"] == []
    api.call("AddSecurityGroupRule", securityGroupUuid=sg["uuid"], rules=[SSH])
    (rule,) = api.query("QuerySecurityGroupRule")
    fault(node, host, "/sg/apply", error="nft exploded", times=1)
    api.fails("DeleteSecurityGroupRule", ruleUuids=[rule["uuid"]])
    assert len(api.query("QuerySecurityGroupRule")) == 1 and len(sg_state(node, host)[nic]["ingress"]) == 1
    fault(node, host, "/sg/apply", error="nft exploded", times=1)
    api.fails("DeleteVmNicFromSecurityGroup", securityGroupUuid=sg["uuid"], vmNicUuids=[nic])
    assert len(api.query("QueryVmNicInSecurityGroup")) == 1 and nic in sg_state(node, host)
    fault(node, host, "/sg/apply", error="nft exploded", times=1)
    api.fails("DeleteSecurityGroup", uuid=sg["uuid"])
    assert len(api.query("QuerySecurityGroup")) == 1 and nic in sg_state(node, host)
    # a VM whose rules cannot be applied does not start
    api.call("StopVmInstance", uuid=vm["uuid"])
    fault(node, host, "/sg/apply", error="nft exploded", times=1)
    api.fails("StartVmInstance", uuid=vm["uuid"])
    assert api.query("QueryVmInstance", ("uuid", "=", vm["uuid"]))[0]["state"] == "Stopped"
    assert nic not in sg_state(node, host)


def test_tenants_see_and_change_only_their_own_groups(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=1)
    with_sg_service(api, env)

    def account(name: str) -> Api:
        api.call("CreateAccount", name=name, password=hashlib.sha512(name.encode()).hexdigest())
        client = Api(node.url)
        client.login(name, name)
        return client

    alice, bob = account("alice"), account("bob")
    mine = alice.call("CreateSecurityGroup", name="alice-sg")["inventory"]
    alice.call("AddSecurityGroupRule", securityGroupUuid=mine["uuid"], rules=[SSH])
    alice.call("AttachSecurityGroupToL3Network", securityGroupUuid=mine["uuid"], l3NetworkUuid=env["l3"]["uuid"])
    bobs_vm = bob.call("CreateVmInstance", name="b", imageUuid=env["image"]["uuid"],
                       instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]])["inventory"]
    assert bob.query("QuerySecurityGroup") == [] and bob.query("QuerySecurityGroupRule") == []
    for call, params in (
        ("UpdateSecurityGroup", {"uuid": mine["uuid"], "name": "x"}),
        ("DeleteSecurityGroup", {"uuid": mine["uuid"]}),
        ("AddSecurityGroupRule", {"securityGroupUuid": mine["uuid"], "rules": [SSH]}),
        ("AddVmNicToSecurityGroup", {"securityGroupUuid": mine["uuid"], "vmNicUuids": [bobs_vm["vmNics"][0]["uuid"]]}),
    ):
        assert bob.fails(call, **params)["code"] == "SYS.1006", call
    # alice cannot put bob's NIC into her group, nor is it her candidate
    err = alice.fails("AddVmNicToSecurityGroup", securityGroupUuid=mine["uuid"],
                      vmNicUuids=[bobs_vm["vmNics"][0]["uuid"]])
    assert err["code"] == "SYS.1006"
    assert alice.call("GetCandidateVmNicForSecurityGroup", securityGroupUuid=mine["uuid"])["inventories"] == []
    assert [g["uuid"] for g in alice.query("QuerySecurityGroup")] == [mine["uuid"]]
    assert [g["uuid"] for g in api.query("QuerySecurityGroup")] == [mine["uuid"]]  # the admin sees all


def test_the_shell_speaks_security_groups(
    node: Running, api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NIMBOSTACK_CLI_HOME", str(tmp_path / "cli"))
    env = build_zone(api, hosts=1)
    with_sg_service(api, env)
    vm = make_vm(api, env)

    def shell(*words: str) -> tuple[int, dict[str, Any]]:
        capsys.readouterr()
        code = cli(["--port", str(node.port), *words])
        out = capsys.readouterr().out
        return code, (json.loads(out) if out.strip().startswith("{") else {"raw": out})

    assert shell("LogInByAccount", "accountName=admin", "password=password")[0] == 0
    code, out = shell("CreateSecurityGroup", "name=shell-sg")
    assert code == 0, out
    sg = out["inventory"]["uuid"]
    l3 = env["l3"]["uuid"]
    assert shell("AttachSecurityGroupToL3Network", f"securityGroupUuid={sg}", f"l3NetworkUuid={l3}")[0] == 0
    web = {"type": "Ingress", "protocol": "TCP", "startPort": 80, "endPort": 80, "allowedCidr": "0.0.0.0/0"}
    rules = json.dumps([web])
    code, out = shell("AddSecurityGroupRule", f"securityGroupUuid={sg}", f"rules={rules}")
    assert code == 0 and out["inventory"]["rules"][0]["startPort"] == 80, out
    assert shell("AddVmNicToSecurityGroup", f"securityGroupUuid={sg}", f"vmNicUuids={vm['vmNics'][0]['uuid']}")[0] == 0
    code, out = shell("QueryVmNicInSecurityGroup", f"securityGroupUuid={sg}")
    assert code == 0 and out["inventories"][0]["vmNicUuid"] == vm["vmNics"][0]["uuid"]
    code, out = shell("QuerySecurityGroupRule", "protocol=TCP", "fields=startPort,allowedCidr")
    assert code == 0 and out["inventories"] == [{"startPort": 80, "allowedCidr": "0.0.0.0/0"}]
    bad = json.dumps([{"type": "Ingress", "protocol": "TCP", "startPort": 80, "endPort": 80, "allowedCidr": "nope"}])
    code, out = shell("AddSecurityGroupRule", f"securityGroupUuid={sg}", f"rules={bad}")
    assert code == 1 and out["error"]["code"] == "SG.1003"
