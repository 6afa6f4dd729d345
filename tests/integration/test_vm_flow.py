"""The backbone end to end on the simulator: infrastructure, VM lifecycle, volumes, capacity."""

from __future__ import annotations

from tests.conftest import Api, build_zone


def test_create_vm_allocates_host_ip_and_volume(api: Api) -> None:
    env = build_zone(api, hosts=2)
    vm = api.call(
        "CreateVmInstance",
        name="vm1",
        imageUuid=env["image"]["uuid"],
        instanceOfferingUuid=env["offering"]["uuid"],
        l3NetworkUuids=[env["l3"]["uuid"]],
    )["inventory"]
    assert vm["state"] == "Running"
    assert vm["hostUuid"] in {h["uuid"] for h in env["hosts"]}
    (nic,) = vm["vmNics"]
    assert nic["ip"].startswith("198.18.") and nic["netmask"] == "255.255.252.0" and nic["gateway"] == "198.18.0.1"
    (root,) = vm["allVolumes"]
    assert root["type"] == "Root" and root["status"] == "Ready" and root["uuid"] == vm["rootVolumeUuid"]
    host = api.query("QueryHost", ("uuid", "=", vm["hostUuid"]))[0]
    assert host["availableMemoryCapacity"] == host["totalMemoryCapacity"] - (128 << 20)
    assert host["availableCpuCapacity"] == host["totalCpuCapacity"] - 100
    # nested query by the NIC's IP
    found = api.query("QueryVmInstance", ("vmNics.ip", "=", nic["ip"]))
    assert [v["uuid"] for v in found] == [vm["uuid"]]


def test_stop_start_reboot_destroy_release_capacity_and_ip(api: Api) -> None:
    env = build_zone(api)
    vm = api.call(
        "CreateVmInstance",
        name="vm1",
        imageUuid=env["image"]["uuid"],
        instanceOfferingUuid=env["offering"]["uuid"],
        l3NetworkUuids=env["l3"]["uuid"],
    )["inventory"]
    host_uuid = vm["hostUuid"]
    assert api.call("StopVmInstance", uuid=vm["uuid"])["inventory"]["state"] == "Stopped"
    host = api.query("QueryHost", ("uuid", "=", host_uuid))[0]
    assert host["availableMemoryCapacity"] == host["totalMemoryCapacity"]
    assert api.call("StartVmInstance", uuid=vm["uuid"])["inventory"]["state"] == "Running"
    assert api.call("RebootVmInstance", uuid=vm["uuid"])["inventory"]["state"] == "Running"
    api.call("DestroyVmInstance", uuid=vm["uuid"])
    (gone,) = api.query("QueryVmInstance", ("uuid", "=", vm["uuid"]))
    assert gone["state"] == "Destroyed" and gone["vmNics"] == []
    host = api.query("QueryHost", ("uuid", "=", host_uuid))[0]
    assert host["availableMemoryCapacity"] == host["totalMemoryCapacity"]
    # Delay policy keeps the root volume until expunged
    assert api.query("QueryVolume", ("uuid", "=", vm["rootVolumeUuid"]))
    api.call("ExpungeVmInstance", uuid=vm["uuid"])
    assert api.query("QueryVmInstance", ("uuid", "=", vm["uuid"])) == []
    assert api.query("QueryVolume", ("uuid", "=", vm["rootVolumeUuid"])) == []


def test_state_rules_and_unknown_uuids_give_clear_errors(api: Api) -> None:
    env = build_zone(api)
    vm = api.call(
        "CreateVmInstance",
        name="vm1",
        imageUuid=env["image"]["uuid"],
        instanceOfferingUuid=env["offering"]["uuid"],
        l3NetworkUuids=[env["l3"]["uuid"]],
    )["inventory"]
    err = api.fails("ExpungeVmInstance", uuid=vm["uuid"])
    assert err["code"] == "SYS.1005" and "Running" in err["details"]
    err = api.fails("StartVmInstance", uuid="0" * 32)
    assert err["code"] == "SYS.1006" and "0" * 32 in err["details"]
    err = api.fails(
        "CreateVmInstance",
        name="x",
        imageUuid=env["image"]["uuid"],
        instanceOfferingUuid=env["offering"]["uuid"],
        l3NetworkUuids=["f" * 32],
    )
    assert err["code"] == "SYS.1006"


def test_no_capacity_rolls_back_everything(api: Api) -> None:
    env = build_zone(api, memory=200 << 20)
    ok = api.call(
        "CreateVmInstance",
        name="fits",
        imageUuid=env["image"]["uuid"],
        instanceOfferingUuid=env["offering"]["uuid"],
        l3NetworkUuids=[env["l3"]["uuid"]],
    )
    assert ok["inventory"]["state"] == "Running"
    err = api.fails(
        "CreateVmInstance",
        name="too-much",
        imageUuid=env["image"]["uuid"],
        instanceOfferingUuid=env["offering"]["uuid"],
        l3NetworkUuids=[env["l3"]["uuid"]],
    )
    assert err["code"] == "HOST_ALLOCATION.1001"
    assert [v["name"] for v in api.query("QueryVmInstance")] == ["fits"]
    assert len(api.query("QueryVolume")) == 1
    assert len(api.query("QueryVmNic")) == 1


def test_data_volume_attach_detach_delete(api: Api) -> None:
    env = build_zone(api)
    vm = api.call(
        "CreateVmInstance",
        name="vm1",
        imageUuid=env["image"]["uuid"],
        instanceOfferingUuid=env["offering"]["uuid"],
        l3NetworkUuids=[env["l3"]["uuid"]],
    )["inventory"]
    vol = api.call("CreateDataVolume", name="data", diskOfferingUuid=env["disk"]["uuid"])["inventory"]
    assert vol["status"] == "NotInstantiated"
    before = api.query("QueryPrimaryStorage")[0]["availableCapacity"]
    att = api.call("AttachDataVolumeToVm", vmInstanceUuid=vm["uuid"], volumeUuid=vol["uuid"])["inventory"]
    assert att["vmInstanceUuid"] == vm["uuid"] and att["deviceId"] == 1 and att["status"] == "Ready"
    assert api.query("QueryPrimaryStorage")[0]["availableCapacity"] == before - (1 << 30)
    err = api.fails("DeleteDataVolume", uuid=vol["uuid"])
    assert "detach" in err["details"]
    api.call("DetachDataVolumeFromVm", uuid=vol["uuid"])
    api.call("UpdateGlobalConfig", category="volume", name="deletionPolicy", value="Direct")
    api.call("DeleteDataVolume", uuid=vol["uuid"])
    assert api.query("QueryVolume", ("uuid", "=", vol["uuid"])) == []
    assert api.query("QueryPrimaryStorage")[0]["availableCapacity"] == before


def test_ip_address_capacity_counts_ranges_and_what_vms_hold(api: Api) -> None:
    env = build_zone(api, cidr_start="198.18.0.10", cidr_end="198.18.0.29")
    l3, zone = env["l3"]["uuid"], env["zone"]["uuid"]
    rng = api.query("QueryIpRange", ("l3NetworkUuid", "=", l3))[0]["uuid"]

    def capacity(**scope: object) -> tuple[int, int]:
        reply = api.call("GetIpAddressCapacity", **scope)
        return reply["totalCapacity"], reply["availableCapacity"]

    assert capacity(l3NetworkUuids=[l3]) == capacity(ipRangeUuids=[rng]) == capacity(zoneUuids=[zone]) == (20, 20)
    vm = api.call("CreateVmInstance", name="ip", imageUuid=env["image"]["uuid"],
                  instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[l3])["inventory"]
    # the VM's NIC, and the Flat DHCP server's address on the VM's host
    assert capacity(l3NetworkUuids=[l3]) == (20, 18)
    assert capacity(all=True)[1] <= 18
    api.call("DestroyVmInstance", uuid=vm["uuid"])  # frees its IP at once (Delay keeps only the volume)
    assert capacity(l3NetworkUuids=[l3]) == (20, 19)
    assert "exactly one" in api.fails("GetIpAddressCapacity")["details"]
    assert "exactly one" in api.fails("GetIpAddressCapacity", l3NetworkUuids=[l3], zoneUuids=[zone])["details"]
    assert api.fails("GetIpAddressCapacity", l3NetworkUuids=["0" * 32])["code"] == "SYS.1006"
