"""The Flat provider on the management plane (simulator): what ``/flat/apply`` each host gets.

The simulator agent records the desired state per host (``FlatService.simulated``); these tests
read it from the agent object running in the test process."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select

from tests.conftest import Api, Running, build_zone

USERDATA = "userdata::#cloud-config\\nusers:\\n  - name: foo\\nruncmd:\\n  - echo hi"
KEY1 = "sshkey::ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC5x3AoWuiZawxXoBxEcOhhdVAST4kJA root@yyy"
KEY2 = "sshkey::ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherKeyForTesting bob@example"


def flat_state(node: Running, host_uuid: str) -> dict[str, Any]:
    agent = node.agent_server.agent
    svc = agent.extensions.get("flat")
    return {} if svc is None else svc.simulated.get(host_uuid, {})


def all_entries(node: Running, l3_uuid: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """nicUuid -> (host, entry) over every simulated host."""
    svc = node.agent_server.agent.extensions["flat"]
    out = {}
    for host, l3s in svc.simulated.items():
        for e in l3s.get(l3_uuid, {}).get("vms", []):
            assert e["nicUuid"] not in out, "a NIC is served by two hosts"
            out[e["nicUuid"]] = (host, e)
    return out


def dhcp_rows(node: Running, l3_uuid: str) -> list[Any]:
    from nimbostack.db import models as m

    async def q() -> list[Any]:
        async with node.platform.db.tx() as s:
            rows = await s.execute(
                select(m.UsedIp).where(m.UsedIp.l3NetworkUuid == l3_uuid, m.UsedIp.usedFor == "DHCP")
            )
            return list(rows.scalars())

    return node.run(q())


def make_vm(api: Api, env: dict[str, Any], name: str = "vm", **extra: Any) -> dict[str, Any]:
    return api.call(
        "CreateVmInstance",
        name=name,
        imageUuid=env["image"]["uuid"],
        instanceOfferingUuid=env["offering"]["uuid"],
        l3NetworkUuids=[env["l3"]["uuid"]],
        **extra,
    )["inventory"]


def entry_of(node: Running, vm: dict[str, Any], l3_uuid: str) -> dict[str, Any] | None:
    (nic,) = [n for n in vm["vmNics"] if n["l3NetworkUuid"] == l3_uuid]
    got = all_entries(node, l3_uuid).get(nic["uuid"])
    if got is None:
        return None
    host, entry = got
    assert host == vm["hostUuid"] or vm["state"] != "Running"
    return entry


def test_vm_lifecycle_pushes_entries_and_dhcp_ip_is_allocated_once(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=2)
    l3 = env["l3"]["uuid"]
    vms = [make_vm(api, env, name=f"web {i}") for i in range(4)]
    (dhcp,) = dhcp_rows(node, l3)
    assert dhcp.ip not in {v["vmNics"][0]["ip"] for v in vms}
    for vm in vms:
        nic = vm["vmNics"][0]
        state = flat_state(node, vm["hostUuid"])[l3]
        assert state["l3"]["dhcpServerIp"] == dhcp.ip
        assert state["l3"]["netmask"] == "255.255.252.0" and state["l3"]["gateway"] == "198.18.0.1"
        assert state["l3"]["dns"] == ["198.18.0.1"] and state["l3"]["bridge"] == "br_eth0"
        assert state["l3"]["physicalInterface"] == "eth0" and state["l3"]["vlan"] is None
        assert sorted(state["l3"]["services"]) == ["DHCP", "Userdata"]
        entry = entry_of(node, vm, l3)
        assert entry == {
            "vmUuid": vm["uuid"],
            "nicUuid": nic["uuid"],
            "mac": nic["mac"],
            "ip": nic["ip"],
            "hostname": vm["name"].replace(" ", "-"),
            "isDefault": True,
            "userdata": None,
            "sshKeys": [],
            "zoneUuid": env["zone"]["uuid"],
        }
    # each host serves exactly its own VMs
    for h in env["hosts"]:
        served = {e["vmUuid"] for e in flat_state(node, h["uuid"]).get(l3, {}).get("vms", [])}
        assert served == {v["uuid"] for v in vms if v["hostUuid"] == h["uuid"]}
    # stop: gone from its host; start: back; destroy: gone; the DHCP IP never changes
    vm = vms[0]
    api.call("StopVmInstance", uuid=vm["uuid"])
    assert entry_of(node, vm, l3) is None
    vm = api.call("StartVmInstance", uuid=vm["uuid"])["inventory"]
    assert entry_of(node, vm, l3)["ip"] == vm["vmNics"][0]["ip"]
    api.call("DestroyVmInstance", uuid=vm["uuid"])
    assert vm["vmNics"][0]["uuid"] not in all_entries(node, l3)
    assert [r.ip for r in dhcp_rows(node, l3)] == [dhcp.ip]
    assert {flat_state(node, h["uuid"])[l3]["l3"]["dhcpServerIp"] for h in env["hosts"]} == {dhcp.ip}


def test_userdata_sshkey_hostname_tags_are_pushed_on_every_change(node: Running, api: Api) -> None:
    env = build_zone(api)
    l3 = env["l3"]["uuid"]
    vm = make_vm(api, env, systemTags=[USERDATA, KEY1, "hostname::db-1.example.org"])
    entry = entry_of(node, vm, l3)
    assert entry["userdata"] == "#cloud-config\nusers:\n  - name: foo\nruncmd:\n  - echo hi"
    assert entry["sshKeys"] == [KEY1[len("sshkey::") :]]
    assert entry["hostname"] == "db-1.example.org"

    (ud,) = api.query("QuerySystemTag", ("resourceUuid", "=", vm["uuid"]), ("tag", "~=", "userdata%"))
    api.call("UpdateSystemTag", uuid=ud["uuid"], tag="userdata::#!/bin/sh\\necho updated")
    assert entry_of(node, vm, l3)["userdata"] == "#!/bin/sh\necho updated"
    api.call("DeleteTag", uuid=ud["uuid"])
    assert entry_of(node, vm, l3)["userdata"] is None
    api.call("CreateSystemTag", resourceUuid=vm["uuid"], resourceType="VmInstanceVO", tag="userdata::again")
    assert entry_of(node, vm, l3)["userdata"] == "again"

    key2 = api.call("CreateSystemTag", resourceUuid=vm["uuid"], resourceType="VmInstanceVO", tag=KEY2)["inventory"]
    assert entry_of(node, vm, l3)["sshKeys"] == [KEY1[8:], KEY2[8:]]
    api.call("DeleteTag", uuid=key2["uuid"])
    assert entry_of(node, vm, l3)["sshKeys"] == [KEY1[8:]]

    (hn,) = api.query("QuerySystemTag", ("resourceUuid", "=", vm["uuid"]), ("tag", "~=", "hostname%"))
    api.call("UpdateSystemTag", uuid=hn["uuid"], tag="hostname::db-2")
    assert entry_of(node, vm, l3)["hostname"] == "db-2"
    api.call("DeleteTag", uuid=hn["uuid"])
    assert entry_of(node, vm, l3)["hostname"] == "vm"
    # a stopped VM's tags change nothing on hosts, and it gets the new data when it starts
    api.call("StopVmInstance", uuid=vm["uuid"])
    api.call("CreateSystemTag", resourceUuid=vm["uuid"], resourceType="VmInstanceVO", tag="hostname::late")
    assert entry_of(node, vm, l3) is None
    vm = api.call("StartVmInstance", uuid=vm["uuid"])["inventory"]
    assert entry_of(node, vm, l3)["hostname"] == "late"


def _vr_l3(api: Api, env: dict[str, Any]) -> dict[str, Any]:
    """Switch build_zone's L3 network to the VirtualRouter provider's DHCP and DNS (pre-1.0 setup)."""
    l3 = env["l3"]["uuid"]
    api.call(
        "DetachNetworkServiceFromL3Network",
        l3NetworkUuid=l3,
        networkServices={env["flat"]["uuid"]: ["DHCP", "Userdata"]},
    )
    vr = api.query("QueryNetworkServiceProvider", ("type", "=", "VirtualRouter"))[0]
    api.call(
        "AttachNetworkServiceProviderToL2Network",
        l2NetworkUuid=env["l2"]["uuid"],
        networkServiceProviderUuid=vr["uuid"],
    )
    api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3, networkServices={vr["uuid"]: ["DHCP", "DNS"]})
    return vr


def test_upgrade_walkthrough_virtual_router_to_flat_then_reconnect_host(node: Running, api: Api) -> None:
    """Release 1.0 §13: the running VMs get their leases from the Flat DHCP after ReconnectHost."""
    env = build_zone(api, hosts=2)
    l3 = env["l3"]["uuid"]
    _vr_l3(api, env)
    vms = [make_vm(api, env, name=f"old{i}") for i in range(3)]
    assert all(l3 not in flat_state(node, h["uuid"]) for h in env["hosts"])
    assert dhcp_rows(node, l3) == []

    # 1. the VirtualRouter provider's services of the L3 network
    refs = api.query("QueryNetworkServiceL3NetworkRef", ("l3NetworkUuid", "=", l3))
    assert {r["networkServiceType"] for r in refs} == {"DHCP", "DNS"}
    vr_uuid = refs[0]["networkServiceProviderUuid"]
    # 2. detach them
    out = api.call("DetachNetworkServiceFromL3Network", l3NetworkUuid=l3, networkServices={vr_uuid: ["DHCP", "DNS"]})
    assert out["inventory"]["networkServices"] == []
    # 3.-5. the Flat provider, attached to the L2 network
    (flat,) = api.query("QueryNetworkServiceProvider", ("type", "=", "Flat"))
    assert flat["networkServiceTypes"][:2] == ["DHCP", "Userdata"]
    (l2,) = api.query("QueryL3Network", ("uuid", "=", l3), fields=["l2NetworkUuid"])
    api.call(
        "AttachNetworkServiceProviderToL2Network",
        l2NetworkUuid=l2["l2NetworkUuid"],
        networkServiceProviderUuid=flat["uuid"],
    )
    # 6. attach Flat's DHCP and Userdata to the L3 network
    api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3, networkServices={flat["uuid"]: ["DHCP", "Userdata"]})
    # 8. reconnect every host: each one now serves its running VMs (as after an agent restart,
    #    when the hosts start from nothing)
    svc = node.agent_server.agent.extensions["flat"]
    svc.simulated.clear()
    stale = "f" * 32
    svc.simulated[env["hosts"][0]["uuid"]] = {stale: {"l3": {"uuid": stale}}}
    for h in api.query("QueryHost"):
        api.call("ReconnectHost", uuid=h["uuid"])
    (dhcp,) = dhcp_rows(node, l3)
    served = all_entries(node, l3)
    assert {e["vmUuid"] for _, e in served.values()} == {v["uuid"] for v in vms}
    for vm in vms:
        host, entry = served[vm["vmNics"][0]["uuid"]]
        assert host == vm["hostUuid"] and entry["ip"] == vm["vmNics"][0]["ip"]
        assert flat_state(node, host)[l3]["l3"]["dhcpServerIp"] == dhcp.ip
    assert stale not in flat_state(node, env["hosts"][0]["uuid"])  # /flat/sync dropped it


def test_combined_providers_flat_acts_only_on_what_it_provides(node: Running, api: Api) -> None:
    env = build_zone(api)
    l3 = env["l3"]["uuid"]
    vr = _vr_l3(api, env)
    # Flat for Userdata only, VirtualRouter for DHCP, DNS, SNAT and EIP: accepted
    api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3, networkServices={vr["uuid"]: ["SNAT", "Eip"]})
    api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3, networkServices={env["flat"]["uuid"]: ["Userdata"]})
    vm = make_vm(api, env, systemTags=[USERDATA])
    state = flat_state(node, vm["hostUuid"])[l3]
    assert state["l3"]["services"] == ["Userdata"]
    assert entry_of(node, vm, l3)["userdata"].startswith("#cloud-config\n")
    # Flat's DHCP next to the VirtualRouter's SNAT/EIP: the spec's mixed setup
    api.call("DetachNetworkServiceFromL3Network", l3NetworkUuid=l3, networkServices={vr["uuid"]: ["DHCP", "DNS"]})
    api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3, networkServices={env["flat"]["uuid"]: ["DHCP"]})
    assert flat_state(node, vm["hostUuid"])[l3]["l3"]["services"] == ["DHCP", "Userdata"]
    refs = {
        (r["networkServiceType"], r["networkServiceProviderUuid"])
        for r in api.query("QueryNetworkServiceL3NetworkRef", ("l3NetworkUuid", "=", l3))
    }
    assert refs == {
        ("SNAT", vr["uuid"]),
        ("Eip", vr["uuid"]),
        ("Userdata", env["flat"]["uuid"]),
        ("DHCP", env["flat"]["uuid"]),
    }
    # both of Flat's services detached: released on the host, DHCP IP given back
    api.call(
        "DetachNetworkServiceFromL3Network",
        l3NetworkUuid=l3,
        networkServices={env["flat"]["uuid"]: ["DHCP", "Userdata"]},
    )
    assert l3 not in flat_state(node, vm["hostUuid"])
    assert dhcp_rows(node, l3) == []


def test_l3_delete_releases_on_every_host(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=2)
    l3 = env["l3"]["uuid"]
    vms = [make_vm(api, env, name=f"v{i}") for i in range(4)]
    assert len(dhcp_rows(node, l3)) == 1
    api.call("UpdateGlobalConfig", category="vm", name="deletionPolicy", value="Direct")
    for vm in vms:
        api.call("DestroyVmInstance", uuid=vm["uuid"])
    hosts = {v["hostUuid"] for v in vms}
    # a host whose last VM on the L3 left no longer serves it
    assert all(l3 not in flat_state(node, h) for h in hosts)
    api.call("DeleteL3Network", uuid=l3)
    assert all(l3 not in flat_state(node, h["uuid"]) for h in env["hosts"])
    assert dhcp_rows(node, l3) == []


def test_injection_attempts_are_refused_or_neutralised(node: Running, api: Api) -> None:
    env = build_zone(api)
    l3 = env["l3"]["uuid"]
    vm = make_vm(api, env)
    for bad in [
        "hostname::a;reboot",
        "hostname::a\nb",
        "hostname::$(touch /tmp/x)",
        'hostname::a",b',
        "sshkey::ssh-rsa AAAA x\ndhcp-option=3,6.6.6.6",
        "sshkey::ssh-rsa $(id) x",
    ]:
        err = api.fails("CreateSystemTag", resourceUuid=vm["uuid"], resourceType="VmInstanceVO", tag=bad)
        assert err["code"] == "SYS.1007", bad
    err = api.fails("CreateL2NoVlanNetwork", name="x", zoneUuid=env["zone"]["uuid"], physicalInterface="eth0;reboot")
    assert err["code"] == "SYS.1007"
    err = api.fails(
        "CreateL3Network", name="x", l2NetworkUuid=env["l2"]["uuid"], dnsDomain="a.org\ndhcp-option=3,6.6.6.6"
    )
    assert err["code"] == "SYS.1007"
    err = api.fails("UpdateL3Network", uuid=l3, dnsDomain="$(reboot)")
    assert err["code"] == "SYS.1007"
    err = api.fails(
        "CreateSystemTag", resourceUuid=env["l2"]["uuid"], resourceType="L2NetworkVO", tag="bridge::br0;reboot"
    )
    assert err["code"] == "SYS.1007"
    # names and userdata are free text: they reach the host as a DNS-safe label and as JSON data only
    evil = make_vm(
        api,
        env,
        name='x"\ny;$(reboot)\ndhcp-host=11:22:33:44:55:66,1.2.3.4',
        systemTags=["userdata::\\ndhcp-option=3,6.6.6.6\\n$(reboot)"],
    )
    entry = entry_of(node, evil, l3)
    assert entry["hostname"] == "x-y-reboot-dhcp-host-11-22-33-44-55-66-1-2-3-4"
    assert entry["userdata"] == "\ndhcp-option=3,6.6.6.6\n$(reboot)"
    nameless = make_vm(api, env, name="!!!")
    assert entry_of(node, nameless, l3)["hostname"] == f"vm-{nameless['uuid'][:8]}"
    # the agent refuses malformed fields itself, whoever sends them

    good = flat_state(node, evil["hostUuid"])[l3]
    for field, value in [("hostname", "a\nb"), ("mac", "fa:00:00:00:00:01\n"), ("ip", "1.2.3.4;"), ("nicUuid", "../x")]:
        body = {**good, "vms": [{**good["vms"][0], field: value}]}
        reply = node.agent_call("/flat/apply", body)
        assert not reply["success"] and reply["error"]["code"] == "AGENT_BAD_COMMAND", (field, reply)
    body = {**good, "l3": {**good["l3"], "bridge": "br0;reboot"}}
    reply = node.agent_call("/flat/apply", body)
    assert reply["error"]["code"] == "AGENT_BAD_COMMAND"


# --- distributed EIP ---------------------------------------------------------------------------


def eip_state(node: Running, host_uuid: str) -> dict[str, Any]:
    svc = node.agent_server.agent.extensions.get("flat-eip")
    return {} if svc is None else svc.simulated.get(host_uuid, {})


def public_l3(api: Api, env: dict[str, Any]) -> dict[str, Any]:
    l2 = api.call("CreateL2NoVlanNetwork", name="pub", zoneUuid=env["zone"]["uuid"], physicalInterface="eth1")[
        "inventory"
    ]
    api.call("AttachL2NetworkToCluster", l2NetworkUuid=l2["uuid"], clusterUuid=env["cluster"]["uuid"])
    l3 = api.call("CreateL3Network", name="public", l2NetworkUuid=l2["uuid"])["inventory"]
    api.call(
        "AddIpRange",
        l3NetworkUuid=l3["uuid"],
        name="pub",
        startIp="198.19.0.10",
        endIp="198.19.0.200",
        netmask="255.255.255.0",
        gateway="198.19.0.1",
    )
    return l3


def test_distributed_eip_follows_the_vm(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=2)
    l3 = env["l3"]["uuid"]
    api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3, networkServices={env["flat"]["uuid"]: ["Eip"]})
    pub = public_l3(api, env)
    vm = make_vm(api, env)
    nic = vm["vmNics"][0]
    vip = api.call("CreateVip", name="vip1", l3NetworkUuid=pub["uuid"], requiredIp="198.19.0.77")["inventory"]
    assert vip["ip"] == "198.19.0.77" and vip["gateway"] == "198.19.0.1" and vip["netmask"] == "255.255.255.0"
    err = api.fails("CreateVip", name="dup", l3NetworkUuid=pub["uuid"], requiredIp="198.19.0.77")
    assert "in use" in err["details"] or "used" in err["details"]
    # an EIP on the VIP's own L3 network, or on a NIC of an L3 without Eip service, is refused
    other = api.call("CreateVip", name="vip2", l3NetworkUuid=l3)["inventory"]
    assert api.fails("CreateEip", name="bad", vipUuid=other["uuid"], vmNicUuid=nic["uuid"])["code"] == "SYS.1007"

    eip = api.call("CreateEip", name="eip1", vipUuid=vip["uuid"], vmNicUuid=nic["uuid"])["inventory"]
    assert eip["vipIp"] == "198.19.0.77" and eip["guestIp"] == nic["ip"] and eip["vmNicUuid"] == nic["uuid"]
    (served,) = eip_state(node, vm["hostUuid"]).values()
    assert served["vip"] == "198.19.0.77" and served["vmIp"] == nic["ip"] and served["vmMac"] == nic["mac"]
    assert served["publicBridge"] == "br_eth1" and served["privateBridge"] == "br_eth0"
    assert served["privateGateway"] == "198.18.0.1" and served["vipGateway"] == "198.19.0.1"
    assert entry_of(node, vm, l3)["publicIp"] == "198.19.0.77"  # metadata public-ipv4
    (q,) = api.query("QueryEip", ("vip.ip", "=", "198.19.0.77"))
    assert q["uuid"] == eip["uuid"]
    (qv,) = api.query("QueryVip", ("uuid", "=", vip["uuid"]))
    assert qv["useFor"] == "Eip" and qv["peerL3NetworkUuid"] == l3 and qv["serviceProvider"] == "Flat"
    assert api.fails("CreateEip", name="again", vipUuid=vip["uuid"])["code"] == "SYS.1005"

    # stop: gone from the host; start on the other host: there
    api.call("StopVmInstance", uuid=vm["uuid"])
    assert all(eip_state(node, h["uuid"]) == {} for h in env["hosts"])
    other_host = next(h["uuid"] for h in env["hosts"] if h["uuid"] != vm["hostUuid"])
    # local storage: the root volume moves first (a VM starts where its volumes are)
    api.call("LocalStorageMigrateVolume", volumeUuid=vm["rootVolumeUuid"], destHostUuid=other_host)
    vm = api.call("StartVmInstance", uuid=vm["uuid"], hostUuid=other_host)["inventory"]
    assert vm["hostUuid"] == other_host and list(eip_state(node, other_host)) == [vip["uuid"]]
    # disable / enable, detach / attach, delete
    api.call("ChangeEipState", uuid=eip["uuid"], stateEvent="disable")
    assert eip_state(node, other_host) == {}
    api.call("ChangeEipState", uuid=eip["uuid"], stateEvent="enable")
    assert list(eip_state(node, other_host)) == [vip["uuid"]]
    out = api.call("DetachEip", uuid=eip["uuid"])["inventory"]
    assert "vmNicUuid" not in out and eip_state(node, other_host) == {}
    assert "publicIp" not in entry_of(node, vm, l3)
    (nics,) = [api.call("GetEipAttachableVmNics", eipUuid=eip["uuid"])["inventories"]]
    assert [n["uuid"] for n in nics] == [nic["uuid"]]
    api.call("AttachEip", eipUuid=eip["uuid"], vmNicUuid=nic["uuid"])
    assert list(eip_state(node, other_host)) == [vip["uuid"]]
    api.call("DeleteEip", uuid=eip["uuid"])
    assert eip_state(node, other_host) == {} and api.query("QueryEip") == []
    assert "useFor" not in api.query("QueryVip", ("uuid", "=", vip["uuid"]))[0]
    api.call("DeleteVip", uuid=vip["uuid"])
    assert api.query("QueryVip", ("uuid", "=", vip["uuid"])) == []
    # the VIP's address is free again
    assert api.call("CreateVip", name="v3", l3NetworkUuid=pub["uuid"], requiredIp="198.19.0.77")["inventory"]


def test_a_vm_start_adds_its_entries_and_a_host_without_state_gets_the_full_state(node: Running, api: Api) -> None:
    """A start sends the VM's own entries (/flat/apply-vm); the host then serves exactly what a full
    push from the records would. An agent that lost its state (restart) gets the full state."""
    env = build_zone(api)
    l3, host = env["l3"]["uuid"], env["hosts"][0]["uuid"]
    first = make_vm(api, env, "a")
    second = make_vm(api, env, "b")
    body = flat_state(node, host)[l3]
    assert [e["vmUuid"] for e in body["vms"]] == [
        v["uuid"] for v in sorted((first, second), key=lambda v: v["vmNics"][0]["ip"])
    ]
    from nimbostack.plugins.flat import service as flat

    full = node.run(flat.desired_state(node.platform, host, l3, {"DHCP", "Userdata"}))
    assert full is not None and body.pop("seq") < full.pop("seq")  # the order of the node's reads
    assert body == full
    # a full state read before a VM's start but arriving after its entries keeps them
    svc = node.agent_server.agent.extensions["flat"]
    before = node.run(flat.desired_state(node.platform, host, l3, {"DHCP", "Userdata"}))
    late = make_vm(api, env, "late")
    assert before is not None and late["uuid"] not in {e["vmUuid"] for e in before["vms"]}
    node.run(svc.apply(before))
    assert late["uuid"] in {e["vmUuid"] for e in flat_state(node, host)[l3]["vms"]}
    # and one read after it (its stop, say) is the state
    api.call("StopVmInstance", uuid=late["uuid"])
    assert late["uuid"] not in {e["vmUuid"] for e in flat_state(node, host)[l3]["vms"]}
    node.run(svc.apply(before))  # the stale state again: the stopped VM's entries were dropped
    assert late["uuid"] not in {e["vmUuid"] for e in flat_state(node, host)[l3]["vms"]}
    # a release read when the host had no VM left, arriving after a VM's start: the L3 stays
    api.call("StartVmInstance", uuid=late["uuid"])
    assert node.run(svc.release(host, l3, before["seq"])) == {"kept": True}
    assert late["uuid"] in {e["vmUuid"] for e in flat_state(node, host)[l3]["vms"]}
    api.call("StopVmInstance", uuid=late["uuid"])
    # the agent restarted: nothing to add to, so the next start pushes every running VM
    svc.simulated.clear()
    svc.added.clear()
    third = make_vm(api, env, "c")
    assert {e["vmUuid"] for e in flat_state(node, host)[l3]["vms"]} == {v["uuid"] for v in (first, second, third)}
    assert late["uuid"] not in {e["vmUuid"] for e in flat_state(node, host)[l3]["vms"]}
    # a stale entry holding the new VM's IP (its stop was never pushed) gives way to it
    stale = dict(flat_state(node, host)[l3]["vms"][0], vmUuid="e" * 32, nicUuid="e" * 32, mac="fa:00:00:00:00:01")
    api.call("StopVmInstance", uuid=first["uuid"])
    svc.simulated[host][l3]["vms"].append(dict(stale, ip=first["vmNics"][0]["ip"]))
    api.call("StartVmInstance", uuid=first["uuid"])
    served = [e for e in flat_state(node, host)[l3]["vms"] if e["ip"] == first["vmNics"][0]["ip"]]
    assert [e["vmUuid"] for e in served] == [first["uuid"]]


def fault(node: Running, host_uuid: str, path: str, **what: Any) -> None:
    """A simulated fault of the simulator agent (agent/guard.py), called in the test process."""
    r = node.agent_call("/simulator/fault", {"hostUuid": host_uuid, "path": path, **what})
    assert r["success"], r


def test_a_failed_start_leaves_no_flat_entry_and_no_eip_rule(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=1)
    l3, host = env["l3"]["uuid"], env["hosts"][0]["uuid"]
    api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3, networkServices={env["flat"]["uuid"]: ["Eip"]})
    pub = public_l3(api, env)
    # CreateVmInstance: the domain fails to start after the Flat entry went to the host
    fault(node, host, "/vm/start", error="no domain today")
    err = api.fails(
        "CreateVmInstance",
        name="doomed",
        imageUuid=env["image"]["uuid"],
        instanceOfferingUuid=env["offering"]["uuid"],
        l3NetworkUuids=[l3],
    )
    assert "no domain today" in json.dumps(err)
    assert api.query("QueryVmInstance") == [] and all_entries(node, l3) == {}
    fault(node, host, "*", clear=True)
    # StartVmInstance of a VM with an EIP: neither its entry nor its EIP rule stays
    vm = make_vm(api, env)
    vip = api.call("CreateVip", name="vip", l3NetworkUuid=pub["uuid"])["inventory"]
    api.call("CreateEip", name="eip", vipUuid=vip["uuid"], vmNicUuid=vm["vmNics"][0]["uuid"])
    assert entry_of(node, vm, l3) is not None and list(eip_state(node, host)) == [vip["uuid"]]
    api.call("StopVmInstance", uuid=vm["uuid"])
    assert entry_of(node, vm, l3) is None and eip_state(node, host) == {}
    fault(node, host, "/vm/start", error="no domain today")
    api.fails("StartVmInstance", uuid=vm["uuid"])
    (now,) = api.query("QueryVmInstance", ("uuid", "=", vm["uuid"]))
    assert now["state"] == "Stopped"
    assert entry_of(node, now, l3) is None and eip_state(node, host) == {}
    # and once the host can start it, both are back
    fault(node, host, "*", clear=True)
    vm = api.call("StartVmInstance", uuid=vm["uuid"])["inventory"]
    assert entry_of(node, vm, l3) is not None and list(eip_state(node, host)) == [vip["uuid"]]
