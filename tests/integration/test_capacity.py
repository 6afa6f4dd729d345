"""Capacity APIs (issue 13 item 12): GetCpuMemoryCapacity, GetPrimaryStorageCapacity,
GetBackupStorageCapacity and GetIpAddressCapacity add up what the hosts, storages and IP ranges of
a scope hold, and follow what VMs, volumes, images and NICs take and give back."""

from __future__ import annotations

import hashlib
from typing import Any

from tests.conftest import Api, Running, build_zone


def _account(api: Api, node: Running, name: str) -> Api:
    api.call("CreateAccount", name=name, password=hashlib.sha512(name.encode()).hexdigest())
    client = Api(node.url)
    client.login(name, name)
    return client


def _vm(api: Api, env: dict[str, Any], name: str = "vm", **extra: Any) -> dict[str, Any]:
    return api.call("CreateVmInstance", name=name, imageUuid=env["image"]["uuid"],
                    instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]],
                    **extra)["inventory"]


def _cpu_mem(api: Api, **scope: Any) -> tuple[int, int, int, int]:
    r = api.call("GetCpuMemoryCapacity", **scope)
    return r["totalCpu"], r["availableCpu"], r["totalMemory"], r["availableMemory"]


def test_cpu_memory_capacity_follows_the_vms_and_the_hosts_states(node: Running, api: Api) -> None:
    cpu, mem = 4 * 2000, 8 << 30
    env = build_zone(api, hosts=2, cpu=cpu, memory=mem)
    zone, cluster = env["zone"]["uuid"], env["cluster"]["uuid"]
    h0, h1 = (h["uuid"] for h in env["hosts"])
    whole = (2 * cpu, 2 * cpu, 2 * mem, 2 * mem)
    assert _cpu_mem(api, all=True) == _cpu_mem(api, zoneUuids=[zone]) == _cpu_mem(api, clusterUuids=[cluster]) == whole
    assert _cpu_mem(api, hostUuids=[h0]) == (cpu, cpu, mem, mem)
    assert _cpu_mem(api, hostUuids=f"{h0},{h1}") == whole  # the CLI's comma list

    offering = env["offering"]
    need_cpu, need_mem = offering["cpuNum"] * offering["cpuSpeed"], offering["memorySize"]
    vm = _vm(api, env)
    on, other = vm["hostUuid"], h1 if vm["hostUuid"] == h0 else h0
    assert _cpu_mem(api, hostUuids=[on]) == (cpu, cpu - need_cpu, mem, mem - need_mem)
    assert _cpu_mem(api, hostUuids=[other]) == (cpu, cpu, mem, mem)
    assert _cpu_mem(api, zoneUuids=[zone]) == (2 * cpu, 2 * cpu - need_cpu, 2 * mem, 2 * mem - need_mem)
    second = _vm(api, env, "vm2", hostUuid=on)
    assert _cpu_mem(api, hostUuids=[on])[1::2] == (cpu - 2 * need_cpu, mem - 2 * need_mem)

    api.call("StopVmInstance", uuid=second["uuid"])  # a Stopped VM holds no CPU or memory
    assert _cpu_mem(api, hostUuids=[on]) == (cpu, cpu - need_cpu, mem, mem - need_mem)
    api.call("DestroyVmInstance", uuid=vm["uuid"])
    assert _cpu_mem(api, all=True) == whole

    # what VMs can be placed on now: a Disabled host's capacity is not counted
    api.call("ChangeHostState", uuid=other, stateEvent="disable")
    assert _cpu_mem(api, zoneUuids=[zone]) == (cpu, cpu, mem, mem)
    assert _cpu_mem(api, hostUuids=[other]) == (0, 0, 0, 0)
    api.call("ChangeHostState", uuid=other, stateEvent="enable")
    assert _cpu_mem(api, zoneUuids=[zone]) == whole

    # bad input: typed errors, never SYS.1000
    assert "exactly one" in api.fails("GetCpuMemoryCapacity")["details"]
    err = api.fails("GetCpuMemoryCapacity", zoneUuids=[zone], hostUuids=[h0])
    assert err["code"] == "SYS.1007" and "exactly one" in err["details"]
    assert api.fails("GetCpuMemoryCapacity", hostUuids=["0" * 32])["code"] == "SYS.1006"
    assert api.fails("GetCpuMemoryCapacity", clusterUuids=[zone])["code"] == "SYS.1006"  # a zone is no cluster
    assert api.fails("GetCpuMemoryCapacity", all="maybe")["code"] == "SYS.1007"
    assert api.fails("GetCpuMemoryCapacity", hostUuids=[{"uuid": h0}])["code"] == "SYS.1007"
    # hosts are the admin's business
    tenant = _account(api, node, "capacity-tenant")
    assert tenant.fails("GetCpuMemoryCapacity", all=True)["code"] == "ID.1003"


def _ps(api: Api, **scope: Any) -> dict[str, int]:
    r = api.call("GetPrimaryStorageCapacity", **scope)
    return {k: r[k] for k in ("totalCapacity", "availableCapacity", "totalPhysicalCapacity",
                              "availablePhysicalCapacity")}


def test_primary_storage_capacity_follows_volumes(node: Running, api: Api) -> None:
    env = build_zone(api)
    zone, cluster, ps = env["zone"]["uuid"], env["cluster"]["uuid"], env["ps"]["uuid"]
    row = api.query("QueryPrimaryStorage", ("uuid", "=", ps))[0]
    first = _ps(api, primaryStorageUuids=[ps])
    assert first == {k: row[k] for k in first} and first["totalCapacity"] > 0
    assert _ps(api, zoneUuids=[zone]) == _ps(api, clusterUuids=[cluster]) == _ps(api, all=True) == first

    vm = _vm(api, env)
    root = api.query("QueryVolume", ("vmInstanceUuid", "=", vm["uuid"]))[0]
    with_root = _ps(api, zoneUuids=[zone])
    assert with_root["availableCapacity"] == first["availableCapacity"] - root["size"]
    assert with_root["totalCapacity"] == first["totalCapacity"]

    vol = api.call("CreateDataVolume", name="data", diskOfferingUuid=env["disk"]["uuid"])["inventory"]
    assert _ps(api, all=True) == with_root  # not instantiated: takes nothing yet
    api.call("AttachDataVolumeToVm", vmInstanceUuid=vm["uuid"], volumeUuid=vol["uuid"])
    assert _ps(api, clusterUuids=[cluster])["availableCapacity"] == with_root["availableCapacity"] - (1 << 30)
    api.call("DetachDataVolumeFromVm", uuid=vol["uuid"])
    api.call("UpdateGlobalConfig", category="volume", name="deletionPolicy", value="Direct")
    api.call("DeleteDataVolume", uuid=vol["uuid"])
    assert _ps(api, primaryStorageUuids=[ps]) == with_root

    # a storage attached to several of the clusters asked about counts once; a second zone's adds up
    c2 = api.call("CreateCluster", name="c2", zoneUuid=zone, hypervisorType="Simulator")["inventory"]["uuid"]
    api.call("AttachPrimaryStorageToCluster", primaryStorageUuid=ps, clusterUuid=c2)
    assert _ps(api, clusterUuids=[cluster, c2]) == with_root
    assert _ps(api, clusterUuids=[c2]) == with_root
    other = build_zone(api)
    theirs = _ps(api, zoneUuids=[other["zone"]["uuid"]])
    assert theirs["totalCapacity"] > 0
    both = _ps(api, all=True)
    assert both == {k: with_root[k] + theirs[k] for k in both}
    assert _ps(api, primaryStorageUuids=[ps, other["ps"]["uuid"]]) == both

    assert "exactly one" in api.fails("GetPrimaryStorageCapacity")["details"]
    assert api.fails("GetPrimaryStorageCapacity", primaryStorageUuids=[zone])["code"] == "SYS.1006"
    assert api.fails("GetPrimaryStorageCapacity", zoneUuids=["not-a-uuid"])["code"] == "SYS.1006"
    tenant = _account(api, node, "ps-tenant")
    assert tenant.fails("GetPrimaryStorageCapacity", zoneUuids=[zone])["code"] == "ID.1003"


def _bs(api: Api, **scope: Any) -> tuple[int, int]:
    r = api.call("GetBackupStorageCapacity", **scope)
    return r["totalCapacity"], r["availableCapacity"]


def test_backup_storage_capacity_follows_images(node: Running, api: Api) -> None:
    env = build_zone(api)
    zone, bs = env["zone"]["uuid"], env["bs"]["uuid"]
    size = env["image"]["actualSize"]
    assert size > 0
    total, available = _bs(api, backupStorageUuids=[bs])
    # build_zone's image already holds its size; the store was added with all of its capacity free
    assert available == total - size
    assert _bs(api, zoneUuids=[zone]) == _bs(api, all=True) == (total, available)
    row = api.query("QueryBackupStorage", ("uuid", "=", bs))[0]
    assert (row["totalCapacity"], row["availableCapacity"]) == (total, available)

    image = api.call("AddImage", name="more", url="http://example.invalid/more.qcow2", format="qcow2",
                     backupStorageUuids=[bs])["inventory"]
    assert _bs(api, zoneUuids=[zone]) == (total, available - image["actualSize"])
    api.call("DeleteImage", uuid=image["uuid"])  # Delay: the copy and its file stay, and what they hold
    assert _bs(api, zoneUuids=[zone]) == (total, available - image["actualSize"])
    api.call("ExpungeImage", imageUuid=image["uuid"])
    assert _bs(api, zoneUuids=[zone]) == (total, available)

    # a second store, attached to two zones: counted once for both, added up with the first
    z2 = api.call("CreateZone", name="z2")["inventory"]["uuid"]
    bs2 = api.call("AddSimulatorBackupStorage", name="bs2", url="/nimbo/bs2", totalCapacity=100 << 30,
                   availableCapacity=60 << 30)["inventory"]["uuid"]
    assert _bs(api, backupStorageUuids=[bs2]) == (100 << 30, 60 << 30)
    assert _bs(api, zoneUuids=[zone]) == (total, available)  # not attached yet
    for z in (zone, z2):
        api.call("AttachBackupStorageToZone", backupStorageUuid=bs2, zoneUuid=z)
    assert _bs(api, zoneUuids=[zone, z2]) == _bs(api, all=True) == (total + (100 << 30), available + (60 << 30))
    assert _bs(api, zoneUuids=[z2]) == (100 << 30, 60 << 30)

    assert "exactly one" in api.fails("GetBackupStorageCapacity", zoneUuids=[zone], all=True)["details"]
    assert api.fails("GetBackupStorageCapacity", backupStorageUuids=[zone])["code"] == "SYS.1006"
    tenant = _account(api, node, "bs-tenant")
    assert tenant.fails("GetBackupStorageCapacity", all=True)["code"] == "ID.1003"


def test_ip_address_capacity_by_range_and_by_account(node: Running, api: Api) -> None:
    env = build_zone(api, cidr_start="198.18.0.10", cidr_end="198.18.0.19")
    l3 = env["l3"]["uuid"]
    r1 = api.query("QueryIpRange", ("l3NetworkUuid", "=", l3))[0]["uuid"]
    r2 = api.call("AddIpRange", l3NetworkUuid=l3, name="r2", startIp="198.18.1.1", endIp="198.18.1.5",
                  netmask="255.255.252.0", gateway="198.18.0.1")["inventory"]["uuid"]

    def ips(**scope: Any) -> tuple[int, int]:
        r = api.call("GetIpAddressCapacity", **scope)
        return r["totalCapacity"], r["availableCapacity"]

    assert ips(ipRangeUuids=[r1]) == (10, 10) and ips(ipRangeUuids=[r2]) == (5, 5)
    assert ips(ipRangeUuids=[r1, r2]) == ips(l3NetworkUuids=[l3]) == ips(all=True) == (15, 15)
    vm = _vm(api, env)
    # the VM's NIC and the DHCP server's address, from the ranges in order
    assert ips(l3NetworkUuids=[l3]) == (15, 13)
    api.call("DestroyVmInstance", uuid=vm["uuid"])
    assert ips(l3NetworkUuids=[l3]) == (15, 14)  # the DHCP server keeps its address
    tenant = _account(api, node, "ip-tenant")
    err = tenant.fails("GetIpAddressCapacity", all=True)
    assert err["code"] == "SYS.1005" and "admin" in err["details"]


def test_local_storage_totals_are_the_sum_of_the_host_shares(node: Running, api: Api) -> None:
    """A connect moves the storage's totals by what that host's share changed: after adds, a VM,
    reconnects and a deleted host they still add up to the shares."""
    env = build_zone(api, hosts=3)
    ps = env["ps"]["uuid"]
    figures = ("totalCapacity", "availableCapacity", "totalPhysicalCapacity", "availablePhysicalCapacity")

    def adds_up() -> dict[str, int]:
        shares = api.call("GetLocalStorageHostDiskCapacity", primaryStorageUuid=ps)["inventories"]
        (row,) = api.query("QueryPrimaryStorage", ("uuid", "=", ps))
        assert {k: row[k] for k in figures} == {k: sum(s[k] for s in shares) for k in figures}
        return {k: row[k] for k in figures}

    three = adds_up()
    vm = _vm(api, env)
    root = api.query("QueryVolume", ("vmInstanceUuid", "=", vm["uuid"]))[0]
    for h in env["hosts"]:
        api.call("ReconnectHost", uuid=h["uuid"])
    assert adds_up()["availableCapacity"] == three["availableCapacity"] - root["size"]
    spare = next(h["uuid"] for h in env["hosts"] if h["uuid"] != vm["hostUuid"])
    api.call("DeleteHost", uuid=spare)
    after = adds_up()
    assert 0 < after["totalCapacity"] < three["totalCapacity"]
