"""A VM's NICs after its creation (simulator): AttachL3NetworkToVm / DetachL3NetworkFromVm hot-plug
a NIC into the running guest with its IP and DHCP entry, GetVmAttachableL3Network, static IPs;
failures leave no NIC, IP or entry behind, and another account's networks and NICs are none."""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import select

from tests.conftest import Api, Running, build_zone
from tests.integration.test_flat_network import all_entries, entry_of, fault, public_l3


def _account(api: Api, node: Running, name: str) -> Api:
    api.call("CreateAccount", name=name, password=hashlib.sha512(name.encode()).hexdigest())
    client = Api(node.url)
    client.login(name, name)
    return client


def _second_l3(api: Api, env: dict[str, Any], client: Api | None = None, name: str = "l3b") -> dict[str, Any]:
    """An L3 network on the zone's L2 with its own range and Flat DHCP (``client`` owns it)."""
    who = client or api
    l3 = who.call("CreateL3Network", name=name, l2NetworkUuid=env["l2"]["uuid"])["inventory"]
    who.call("AddIpRange", l3NetworkUuid=l3["uuid"], name="rb", startIp="198.18.8.10", endIp="198.18.8.20",
             netmask="255.255.255.0", gateway="198.18.8.1")
    who.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3["uuid"],
             networkServices={env["flat"]["uuid"]: ["DHCP"]})
    return l3


def _vm(client: Api, env: dict[str, Any], name: str = "vm") -> dict[str, Any]:
    return client.call("CreateVmInstance", name=name, imageUuid=env["image"]["uuid"],
                       instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]])["inventory"]


def _free_ips(api: Api, l3_uuid: str) -> int:
    return int(api.call("GetIpAddressCapacity", l3NetworkUuids=[l3_uuid])["availableCapacity"])


def _nic_ips(node: Running, l3_uuid: str) -> list[str]:
    """The IPs of the L3 network held for NICs (not its DHCP server's, taken at its first lease)."""
    from nimbostack.db import models as m

    async def q() -> list[str]:
        async with node.platform.db.tx() as s:
            rows = await s.execute(
                select(m.UsedIp.ip).where(m.UsedIp.l3NetworkUuid == l3_uuid, m.UsedIp.usedFor == "VmNic")
            )
            return sorted(rows.scalars())

    return node.run(q())


def _guest_macs(node: Running, vm: dict[str, Any]) -> list[str]:
    state = node.agent_call("/simulator/state", {"hostUuid": vm["hostUuid"]})
    assert state["success"], state
    return list(state["nics"].get(vm["uuid"], []))


def _attachable(api: Api, vm_uuid: str) -> set[str]:
    return {i["uuid"] for i in api.call("GetVmAttachableL3Network", vmInstanceUuid=vm_uuid)["inventories"]}


def test_a_running_vm_gets_a_hot_plugged_nic_and_loses_it_again(node: Running, api: Api) -> None:
    env = build_zone(api)
    l3b = _second_l3(api, env)
    vm = _vm(api, env)
    assert _attachable(api, vm["uuid"]) == {l3b["uuid"]}
    free = _free_ips(api, l3b["uuid"])

    out = api.call("AttachL3NetworkToVm", vmInstanceUuid=vm["uuid"], l3NetworkUuid=l3b["uuid"])["inventory"]
    (nic,) = [n for n in out["vmNics"] if n["l3NetworkUuid"] == l3b["uuid"]]
    assert len(out["vmNics"]) == 2 and nic["deviceId"] == 1
    assert nic["ip"].startswith("198.18.8.") and nic["gateway"] == "198.18.8.1" and nic["netmask"] == "255.255.255.0"
    # the NIC's address, and the DHCP server's: this is the L3 network's first lease
    assert _free_ips(api, l3b["uuid"]) == free - 2 and _nic_ips(node, l3b["uuid"]) == [nic["ip"]]
    # the guest has the NIC, and the host serves its DHCP lease
    assert nic["mac"] in _guest_macs(node, vm)
    entry = entry_of(node, out, l3b["uuid"])
    assert entry is not None and entry["ip"] == nic["ip"] and entry["mac"] == nic["mac"]
    assert entry["isDefault"] is False
    assert _attachable(api, vm["uuid"]) == set()
    # the same network twice is refused
    err = api.fails("AttachL3NetworkToVm", vmInstanceUuid=vm["uuid"], l3NetworkUuid=l3b["uuid"])
    assert err["code"] == "SYS.1005" and "already has a NIC" in err["details"]

    out = api.call("DetachL3NetworkFromVm", vmNicUuid=nic["uuid"])["inventory"]
    assert [n["l3NetworkUuid"] for n in out["vmNics"]] == [env["l3"]["uuid"]]
    assert nic["mac"] not in _guest_macs(node, vm)
    assert nic["uuid"] not in all_entries(node, l3b["uuid"])
    assert _free_ips(api, l3b["uuid"]) == free - 1 and _nic_ips(node, l3b["uuid"]) == []
    assert api.query("QueryVmNic", ("uuid", "=", nic["uuid"])) == []
    assert api.fails("DetachL3NetworkFromVm", vmNicUuid=nic["uuid"])["code"] == "SYS.1006"


def test_detaching_the_default_network_moves_the_default_and_a_restart_keeps_the_nics(
    node: Running, api: Api
) -> None:
    env = build_zone(api)
    l3b = _second_l3(api, env)
    vm = _vm(api, env)
    api.call("StopVmInstance", uuid=vm["uuid"])
    # a stopped VM gets the NIC in the database only; its next start plugs it
    out = api.call("AttachL3NetworkToVm", vmInstanceUuid=vm["uuid"], l3NetworkUuid=l3b["uuid"])["inventory"]
    assert out["state"] == "Stopped" and len(out["vmNics"]) == 2
    vm = api.call("StartVmInstance", uuid=vm["uuid"])["inventory"]
    assert sorted(_guest_macs(node, vm)) == sorted(n["mac"] for n in vm["vmNics"])
    assert entry_of(node, vm, l3b["uuid"]) is not None
    default_nic = next(n for n in vm["vmNics"] if n["l3NetworkUuid"] == env["l3"]["uuid"])
    out = api.call("DetachL3NetworkFromVm", vmNicUuid=default_nic["uuid"])["inventory"]
    assert out["defaultL3NetworkUuid"] == l3b["uuid"]
    assert entry_of(node, out, l3b["uuid"])["isDefault"] is True  # type: ignore[index]
    # the last NIC goes too: the VM has no default network, and the answer carries no null
    out = api.call("DetachL3NetworkFromVm", vmNicUuid=out["vmNics"][0]["uuid"])["inventory"]
    assert out["vmNics"] == [] and "defaultL3NetworkUuid" not in out
    out = api.call("AttachL3NetworkToVm", vmInstanceUuid=vm["uuid"], l3NetworkUuid=env["l3"]["uuid"])["inventory"]
    assert out["defaultL3NetworkUuid"] == env["l3"]["uuid"] and out["vmNics"][0]["deviceId"] == 0


def test_a_failed_hot_plug_leaves_no_nic_ip_or_lease(node: Running, api: Api) -> None:
    env = build_zone(api)
    l3b = _second_l3(api, env)
    vm = _vm(api, env)
    host = vm["hostUuid"]
    fault(node, host, "/vm/attach-nic", error="no PCI slot left")
    err = api.fails("AttachL3NetworkToVm", vmInstanceUuid=vm["uuid"], l3NetworkUuid=l3b["uuid"], staticIp="198.18.8.15")
    assert err["code"] == "HOST.1001" and "no PCI slot left" in str(err)
    (now,) = api.query("QueryVmInstance", ("uuid", "=", vm["uuid"]))
    assert len(now["vmNics"]) == 1 and now["state"] == "Running"
    assert _nic_ips(node, l3b["uuid"]) == [] and api.query("QueryVmNic", ("l3NetworkUuid", "=", l3b["uuid"])) == []
    assert all_entries(node, l3b["uuid"]) == {}
    assert len(_guest_macs(node, vm)) == 1
    assert api.query("QuerySystemTag", ("resourceUuid", "=", vm["uuid"]), ("tag", "~=", "staticIp::%")) == []
    # the host's DHCP push failing fails the attach the same way, before the guest sees a NIC
    fault(node, host, "*", clear=True)
    fault(node, host, "/flat/apply", error="dnsmasq is gone")
    err = api.fails("AttachL3NetworkToVm", vmInstanceUuid=vm["uuid"], l3NetworkUuid=l3b["uuid"])
    assert err["code"] == "HOST.1001" and "dnsmasq is gone" in str(err)
    assert len(_guest_macs(node, vm)) == 1 and _nic_ips(node, l3b["uuid"]) == []
    fault(node, host, "*", clear=True)
    # and once the host is well, the same call works
    out = api.call("AttachL3NetworkToVm", vmInstanceUuid=vm["uuid"], l3NetworkUuid=l3b["uuid"], staticIp="198.18.8.15")[
        "inventory"
    ]
    assert "198.18.8.15" in [n["ip"] for n in out["vmNics"]]


def test_attach_refuses_what_the_vm_cannot_take(node: Running, api: Api) -> None:
    env = build_zone(api)
    vm = _vm(api, env)
    # an L2 the VM's cluster does not reach: not offered, and refused
    far_l2 = api.call("CreateL2NoVlanNetwork", name="far", zoneUuid=env["zone"]["uuid"], physicalInterface="eth9")
    far = api.call("CreateL3Network", name="far", l2NetworkUuid=far_l2["inventory"]["uuid"])["inventory"]
    l3b = _second_l3(api, env)
    assert _attachable(api, vm["uuid"]) == {l3b["uuid"]}
    err = api.fails("AttachL3NetworkToVm", vmInstanceUuid=vm["uuid"], l3NetworkUuid=far["uuid"])
    assert err["code"] == "SYS.1005" and "not attached to" in err["details"]
    # a disabled L3 network
    api.call("ChangeL3NetworkState", uuid=l3b["uuid"], stateEvent="disable")
    assert _attachable(api, vm["uuid"]) == set()
    assert api.fails("AttachL3NetworkToVm", vmInstanceUuid=vm["uuid"], l3NetworkUuid=l3b["uuid"])["code"] == "SYS.1005"
    api.call("ChangeL3NetworkState", uuid=l3b["uuid"], stateEvent="enable")
    # a static IP another NIC holds, or outside every range
    other = _vm(api, env, "other")
    taken = other["vmNics"][0]["ip"]
    api.call("DetachL3NetworkFromVm", vmNicUuid=vm["vmNics"][0]["uuid"])
    err = api.fails("AttachL3NetworkToVm", vmInstanceUuid=vm["uuid"], l3NetworkUuid=env["l3"]["uuid"], staticIp=taken)
    assert err["code"] == "L3.1001"
    err = api.fails("AttachL3NetworkToVm", vmInstanceUuid=vm["uuid"], l3NetworkUuid=l3b["uuid"], staticIp="10.9.9.9")
    assert err["code"] == "SYS.1007"
    # a NIC with an EIP keeps it until the EIP is detached
    api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=env["l3"]["uuid"],
             networkServices={env["flat"]["uuid"]: ["Eip"]})
    vip = api.call("CreateVip", name="vip", l3NetworkUuid=public_l3(api, env)["uuid"])["inventory"]
    eip = api.call("CreateEip", name="eip", vipUuid=vip["uuid"], vmNicUuid=other["vmNics"][0]["uuid"])["inventory"]
    err = api.fails("DetachL3NetworkFromVm", vmNicUuid=other["vmNics"][0]["uuid"])
    assert err["code"] == "SYS.1005" and eip["uuid"] in err["details"]
    assert len(api.query("QueryVmInstance", ("uuid", "=", other["uuid"]))[0]["vmNics"]) == 1


def test_another_accounts_networks_and_nics_are_none(node: Running, api: Api) -> None:
    env = build_zone(api)
    alice, bob = _account(api, node, "alice"), _account(api, node, "bob")
    bobs_l3 = _second_l3(api, env, bob, "bob-l3")
    alices_vm = _vm(alice, env, "a")
    bobs_vm = _vm(bob, env, "b")
    # bob's network is not offered to alice, and naming it finds nothing
    assert bobs_l3["uuid"] not in _attachable(alice, alices_vm["uuid"])
    assert bobs_l3["uuid"] in _attachable(bob, bobs_vm["uuid"])
    err = alice.fails("AttachL3NetworkToVm", vmInstanceUuid=alices_vm["uuid"], l3NetworkUuid=bobs_l3["uuid"])
    assert err["code"] == "SYS.1006"
    # nor do bob's VM and NIC exist for alice
    assert alice.fails("GetVmAttachableL3Network", vmInstanceUuid=bobs_vm["uuid"])["code"] == "SYS.1006"
    err = alice.fails("DetachL3NetworkFromVm", vmNicUuid=bobs_vm["vmNics"][0]["uuid"])
    assert err["code"] == "SYS.1006" and bobs_vm["uuid"] not in err["details"]
    assert len(bob.query("QueryVmInstance")[0]["vmNics"]) == 1
    # bob uses his own network on his own VM
    out = bob.call("AttachL3NetworkToVm", vmInstanceUuid=bobs_vm["uuid"], l3NetworkUuid=bobs_l3["uuid"])["inventory"]
    assert len(out["vmNics"]) == 2


def _dhcp_ip(node: Running, l3_uuid: str) -> str | None:
    """The L3 network's DHCP server address (Flat takes one of its range at the first VM)."""
    from nimbostack.plugins.flat import service as flat

    row = node.run(flat.dhcp_ip(node.platform, l3_uuid))
    return None if row is None else str(row.ip)


def test_static_ip_of_a_stopped_vm(node: Running, api: Api) -> None:
    env = build_zone(api)
    l3 = env["l3"]["uuid"]
    vm = _vm(api, env)
    old_ip = vm["vmNics"][0]["ip"]
    # an address no one holds: not the VM's (allocated at random) nor the DHCP server's
    held = {old_ip, _dhcp_ip(node, l3)}
    want = next(ip for ip in ("198.18.2.2", "198.18.2.3", "198.18.2.4") if ip not in held)
    err = api.fails("SetVmStaticIp", vmInstanceUuid=vm["uuid"], l3NetworkUuid=l3, ip=want)
    assert err["code"] == "SYS.1005" and "Stopped" in err["details"]
    api.call("StopVmInstance", uuid=vm["uuid"])
    out = api.call("SetVmStaticIp", vmInstanceUuid=vm["uuid"], l3NetworkUuid=l3, ip=want)["inventory"]
    assert out["vmNics"][0]["ip"] == want
    tags = [t["tag"] for t in api.query("QuerySystemTag", ("resourceUuid", "=", vm["uuid"]))]
    assert f"staticIp::{l3}::{want}" in tags
    # the old address is free again: another VM may take it
    other = api.call("CreateVmInstance", name="o", imageUuid=env["image"]["uuid"],
                     instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[l3],
                     systemTags=[f"staticIp::{l3}::{old_ip}"])["inventory"]
    assert other["vmNics"][0]["ip"] == old_ip
    err = api.fails("SetVmStaticIp", vmInstanceUuid=vm["uuid"], l3NetworkUuid=l3, ip=old_ip)
    assert err["code"] == "L3.1001"
    vm = api.call("StartVmInstance", uuid=vm["uuid"])["inventory"]
    assert entry_of(node, vm, l3)["ip"] == want  # type: ignore[index]
    api.call("DeleteVmStaticIp", vmInstanceUuid=vm["uuid"], l3NetworkUuid=l3)
    tags = [t["tag"] for t in api.query("QuerySystemTag", ("resourceUuid", "=", vm["uuid"]))]
    assert not [t for t in tags if t.startswith("staticIp::")]
    (now,) = api.query("QueryVmInstance", ("uuid", "=", vm["uuid"]))
    assert now["vmNics"][0]["ip"] == want  # the NIC keeps its address
