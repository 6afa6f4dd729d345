"""Volume snapshots, LocalStorageMigrateVolume (1.0 §3), SharedMountPoint primary storage (1.2)
and MigrateVm with its CPU-mode rule (1.0 §9), on simulated hosts."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import Api, Running, build_zone

# --- helpers ---------------------------------------------------------------------------------------


def agent(node: Running, command: str, /, **body: Any) -> dict:
    data = node.agent_call(command, body)
    assert data["success"], data
    return data


def sim(node: Running, host: str) -> dict:
    return agent(node, "/simulator/state", hostUuid=host)


def gc_entries(api: Api, **filters: str) -> list[dict]:
    r = httpx.get(f"{api.base}/gc", params=filters, headers={"Authorization": f"OAuth {api.session}"}, timeout=30)
    return r.json()["inventories"]


def vm_of(api: Api, env: dict, name: str = "vm", **extra: Any) -> dict:
    return api.call("CreateVmInstance", name=name, imageUuid=env["image"]["uuid"],
                    instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]],
                    **extra)["inventory"]


def volume(api: Api, uuid: str) -> dict:
    return api.query("QueryVolume", ("uuid", "=", uuid))[0]


def placed(api: Api, uuid: str) -> str:
    """The host a LocalStorage resource (volume, snapshot) is charged to."""
    return api.query("QueryLocalStorageResourceRef", ("resourceUuid", "=", uuid))[0]["hostUuid"]


def shares(api: Api, ps: str) -> dict[str, int]:
    return {r["hostUuid"]: r["availableCapacity"]
            for r in api.call("GetLocalStorageHostDiskCapacity", primaryStorageUuid=ps)["inventories"]}


def host(api: Api, uuid: str) -> dict:
    return api.query("QueryHost", ("uuid", "=", uuid))[0]


def fails(api: Api, api_name: str, /, **params: Any) -> str:
    err = api.fails(api_name, **params)
    return f"{err['description']} {err['details']}"


# --- snapshots -----------------------------------------------------------------------------------------


def test_snapshots_live_and_stopped_revert_delete(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=1)
    ps, h1 = env["ps"]["uuid"], env["hosts"][0]["uuid"]
    vm = vm_of(api, env)
    root = vm["allVolumes"][0]
    before = shares(api, ps)[h1]

    # a running VM's disk switches to a new file; the old one is the snapshot
    s1 = api.call("CreateVolumeSnapshot", volumeUuid=root["uuid"], name="s1", description="first")["inventory"]
    assert s1["volumeUuid"] == root["uuid"] and s1["volumeType"] == "Root" and s1["format"] == "qcow2"
    assert s1["primaryStorageInstallPath"] == root["installPath"] and s1["latest"] and "parentUuid" not in s1
    assert s1["type"] == "Hypervisor" and s1["status"] == "Ready" and s1["primaryStorageUuid"] == ps
    top1 = volume(api, root["uuid"])["installPath"]
    assert top1 != root["installPath"] and top1.startswith(root["installPath"].rsplit("/", 1)[0])
    state = sim(node, h1)
    assert state["disks"][vm["uuid"]][0] == top1 and {root["installPath"], top1} <= set(state["files"])
    assert placed(api, s1["uuid"]) == h1

    s2 = api.call("CreateVolumeSnapshot", volumeUuid=root["uuid"], name="s2")["inventory"]
    assert s2["parentUuid"] == s1["uuid"] and s2["treeUuid"] == s1["treeUuid"]
    snaps = {x["uuid"]: x for x in api.query("QueryVolumeSnapshot", ("volumeUuid", "=", root["uuid"]))}
    assert not snaps[s1["uuid"]]["latest"] and snaps[s2["uuid"]]["latest"]
    assert api.query("QueryVolumeSnapshotTree", ("volumeUuid", "=", root["uuid"]))[0]["uuid"] == s1["treeUuid"]
    assert [v["uuid"] for v in api.query("QueryVolume", ("snapshot.name", "=", "s2"))] == [root["uuid"]]

    # revert and deleting a snapshot the running disk depends on need the VM stopped
    assert "Stopped" in fails(api, "RevertVolumeFromSnapshot", uuid=s1["uuid"])
    assert "Stopped" in fails(api, "DeleteVolumeSnapshot", uuid=s1["uuid"])
    api.call("StopVmInstance", uuid=vm["uuid"])
    top2 = volume(api, root["uuid"])["installPath"]
    api.call("RevertVolumeFromSnapshot", uuid=s1["uuid"])
    top3 = volume(api, root["uuid"])["installPath"]
    files = sim(node, h1)["files"]
    assert top3 not in (top1, top2) and top3 in files and top2 not in files  # what was written since: gone
    snaps = {x["uuid"]: x for x in api.query("QueryVolumeSnapshot", ("volumeUuid", "=", root["uuid"]))}
    assert snaps[s1["uuid"]]["latest"] and not snaps[s2["uuid"]]["latest"]

    # s2 is a branch now: deleting it leaves the volume alone
    api.call("DeleteVolumeSnapshot", uuid=s2["uuid"])
    assert top1 not in sim(node, h1)["files"]
    # s1 is under the volume: it is merged into the volume's file, then deleted
    api.call("DeleteVolumeSnapshot", uuid=s1["uuid"])
    assert api.query("QueryVolumeSnapshot", ("volumeUuid", "=", root["uuid"])) == []
    assert api.query("QueryVolumeSnapshotTree", ("volumeUuid", "=", root["uuid"])) == []
    assert root["installPath"] not in sim(node, h1)["files"] and top3 in sim(node, h1)["files"]
    assert shares(api, ps)[h1] == before
    assert api.call("StartVmInstance", uuid=vm["uuid"])["inventory"]["state"] == "Running"
    assert sim(node, h1)["disks"][vm["uuid"]][0] == top3

    # a volume without a file has nothing to snapshot; expunging a volume takes its snapshots along
    vol = api.call("CreateDataVolume", name="d", diskOfferingUuid=env["disk"]["uuid"])["inventory"]
    assert "NotInstantiated" in fails(api, "CreateVolumeSnapshot", volumeUuid=vol["uuid"], name="x")
    api.call("AttachDataVolumeToVm", vmInstanceUuid=vm["uuid"], volumeUuid=vol["uuid"])
    ds = api.call("CreateVolumeSnapshot", volumeUuid=vol["uuid"], name="d1")["inventory"]
    api.call("DetachDataVolumeFromVm", uuid=vol["uuid"])
    api.call("UpdateGlobalConfig", category="volume", name="deletionPolicy", value="Direct")
    api.call("DeleteDataVolume", uuid=vol["uuid"])
    assert ds["primaryStorageInstallPath"] not in sim(node, h1)["files"]
    assert api.query("QueryVolumeSnapshot", ("uuid", "=", ds["uuid"])) == []
    assert api.query("QueryLocalStorageResourceRef", ("resourceUuid", "=", ds["uuid"])) == []


# --- LocalStorageMigrateVolume --------------------------------------------------------------------------


def test_local_storage_migration_rules(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=3)
    ps = env["ps"]["uuid"]
    h1, h2, h3 = (h["uuid"] for h in env["hosts"])
    vm = vm_of(api, env, hostUuid=h1)
    root = vm["allVolumes"][0]["uuid"]

    assert "stop the VM first" in fails(api, "LocalStorageMigrateVolume", volumeUuid=root, destHostUuid=h2)
    vol = api.call("CreateDataVolume", name="d", diskOfferingUuid=env["disk"]["uuid"])["inventory"]["uuid"]
    assert "NotInstantiated" in fails(api, "LocalStorageMigrateVolume", volumeUuid=vol, destHostUuid=h2)
    api.call("AttachDataVolumeToVm", vmInstanceUuid=vm["uuid"], volumeUuid=vol)
    assert "detach it first" in fails(api, "LocalStorageMigrateVolume", volumeUuid=vol, destHostUuid=h2)
    api.call("StopVmInstance", uuid=vm["uuid"])
    assert "already" in fails(api, "LocalStorageMigrateVolume", volumeUuid=root, destHostUuid=h1)

    # a host of another cluster, not attached to the storage
    other = api.call("CreateCluster", name="c2", zoneUuid=env["zone"]["uuid"], hypervisorType="Simulator")["inventory"]
    h4 = api.call("AddSimulatorHost", name="h4", managementIp="10.9.0.4", clusterUuid=other["uuid"],
                  cpuCapacity=8000, memoryCapacity=8 << 30)["inventory"]["uuid"]
    assert "not attached" in fails(api, "LocalStorageMigrateVolume", volumeUuid=root, destHostUuid=h4)
    api.call("ChangeHostState", uuid=h3, stateEvent="disable")
    assert "Enabled" in fails(api, "LocalStorageMigrateVolume", volumeUuid=root, destHostUuid=h3)
    api.call("ChangeHostState", uuid=h3, stateEvent="enable")

    # not enough room: fill host 3's share with a volume of almost all of it
    free = shares(api, ps)[h3]
    # (the filler's root volume takes 1 GiB, the simulated image's size; 512 MiB stay free)
    big = api.call("CreateDiskOffering", name="big", diskSize=free - (1 << 30) - (512 << 20))["inventory"]["uuid"]
    vm_of(api, env, name="filler", hostUuid=h3, dataDiskOfferingUuids=[big])
    err = api.fails("LocalStorageMigrateVolume", volumeUuid=root, destHostUuid=h3)
    assert err["code"] == "PS.1001" and "bytes" in err["details"]
    migratable = [h["uuid"] for h in api.call("LocalStorageGetVolumeMigratableHosts", volumeUuid=root)["inventories"]]
    assert migratable == [h2]

    # StartVmInstance elsewhere than the root volume's host says how to get there
    assert "LocalStorageMigrateVolume" in fails(api, "StartVmInstance", uuid=vm["uuid"], hostUuid=h2)
    assert volume(api, root)["status"] == "Ready" and placed(api, root) == h1
    # the root volume moved without the attached data volume: the VM has no host to start on
    api.call("LocalStorageMigrateVolume", volumeUuid=root, destHostUuid=h2)
    assert "several hosts" in fails(api, "StartVmInstance", uuid=vm["uuid"])
    api.call("DetachDataVolumeFromVm", uuid=vol)
    api.call("LocalStorageMigrateVolume", volumeUuid=vol, destHostUuid=h2)
    api.call("AttachDataVolumeToVm", vmInstanceUuid=vm["uuid"], volumeUuid=vol)
    assert api.call("StartVmInstance", uuid=vm["uuid"])["inventory"]["hostUuid"] == h2


def test_migrate_root_and_data_volume_with_snapshots(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=2)
    ps = env["ps"]["uuid"]
    h1, h2 = (h["uuid"] for h in env["hosts"])
    vm = vm_of(api, env, hostUuid=h1, dataDiskOfferingUuids=[env["disk"]["uuid"]])
    root = next(v for v in vm["allVolumes"] if v["type"] == "Root")
    data = next(v for v in vm["allVolumes"] if v["type"] == "Data")
    snap = api.call("CreateVolumeSnapshot", volumeUuid=root["uuid"], name="before-move")["inventory"]
    dsnap = api.call("CreateVolumeSnapshot", volumeUuid=data["uuid"], name="data-snap")["inventory"]
    api.call("StopVmInstance", uuid=vm["uuid"])
    api.call("DetachDataVolumeFromVm", uuid=data["uuid"])
    before = shares(api, ps)
    total_before = api.query("QueryPrimaryStorage", ("uuid", "=", ps))[0]["availableCapacity"]
    root_files = [volume(api, root["uuid"])["installPath"], snap["primaryStorageInstallPath"]]
    cache = sim(node, h1)["files"]
    cache = [f for f in cache if "/imagecache/" in f]
    assert cache and not [f for f in sim(node, h2)["files"] if "/imagecache/" in f]

    moved = api.call("LocalStorageMigrateVolume", volumeUuid=root["uuid"], destHostUuid=h2)["inventory"]
    assert moved["status"] == "Ready" and moved["installPath"] == root_files[0]
    assert placed(api, root["uuid"]) == h2 and placed(api, snap["uuid"]) == h2
    files1, files2 = sim(node, h1)["files"], sim(node, h2)["files"]
    assert all(f in files2 and f not in files1 for f in root_files)
    assert cache[0] in files2  # the image the volume is backed by came along
    after = shares(api, ps)
    moved_bytes = root["size"] + snap["size"]
    assert after[h1] == before[h1] + moved_bytes and after[h2] == before[h2] - moved_bytes
    assert api.query("QueryPrimaryStorage", ("uuid", "=", ps))[0]["availableCapacity"] == total_before

    # the data volume and its snapshot follow; the VM starts where its volumes are
    api.call("LocalStorageMigrateVolume", volumeUuid=data["uuid"], destHostUuid=h2)
    assert placed(api, data["uuid"]) == h2 and placed(api, dsnap["uuid"]) == h2
    assert dsnap["primaryStorageInstallPath"] in sim(node, h2)["files"]
    started = api.call("StartVmInstance", uuid=vm["uuid"])["inventory"]
    assert started["state"] == "Running" and started["hostUuid"] == h2
    assert vm["uuid"] in sim(node, h2)["domains"]
    api.call("AttachDataVolumeToVm", vmInstanceUuid=vm["uuid"], volumeUuid=data["uuid"])
    # its snapshots still revert (on the new host)
    api.call("StopVmInstance", uuid=vm["uuid"])
    api.call("RevertVolumeFromSnapshot", uuid=snap["uuid"])
    assert api.call("StartVmInstance", uuid=vm["uuid"])["inventory"]["hostUuid"] == h2


def test_failed_copy_leaves_the_volume_where_it_was(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=2)
    ps = env["ps"]["uuid"]
    h1, h2 = (h["uuid"] for h in env["hosts"])
    vm = vm_of(api, env, hostUuid=h1)
    root = vm["allVolumes"][0]
    api.call("StopVmInstance", uuid=vm["uuid"])
    before = shares(api, ps)

    # the destination fails the copy: nothing moved, nothing charged
    agent(node, "/simulator/fault", hostUuid=h2, path="/storage/local/pull", error="disk full")
    assert "disk full" in fails(api, "LocalStorageMigrateVolume", volumeUuid=root["uuid"], destHostUuid=h2)
    assert placed(api, root["uuid"]) == h1 and volume(api, root["uuid"])["status"] == "Ready"
    assert shares(api, ps) == before and root["installPath"] in sim(node, h1)["files"]

    # the destination dies mid-copy: what it may have written is deleted when it is back (GC)
    agent(node, "/simulator/fault", hostUuid=h2, path="*", unreachable=True)
    api.fails("LocalStorageMigrateVolume", volumeUuid=root["uuid"], destHostUuid=h2)
    assert placed(api, root["uuid"]) == h1 and shares(api, ps) == before
    pending = gc_entries(api, status="Pending", hostUuid=h2)
    assert {e["body"]["installPath"] for e in pending} == {root["installPath"]}
    agent(node, "/simulator/fault", hostUuid=h2, clear=True)
    api.call("ReconnectHost", uuid=h2)
    assert gc_entries(api, status="Pending", hostUuid=h2) == []
    assert root["installPath"] not in sim(node, h2)["files"]

    # the source is unreachable once the copy is done: the migration stands, the GC cleans up
    agent(node, "/simulator/fault", hostUuid=h1, path="/storage/local/delete", unreachable=True)
    api.call("LocalStorageMigrateVolume", volumeUuid=root["uuid"], destHostUuid=h2)
    assert placed(api, root["uuid"]) == h2
    assert root["installPath"] in sim(node, h1)["files"] and root["installPath"] in sim(node, h2)["files"]
    assert [e["body"]["installPath"] for e in gc_entries(api, status="Pending", hostUuid=h1)] == [root["installPath"]]
    agent(node, "/simulator/fault", hostUuid=h1, clear=True)
    api.call("ReconnectHost", uuid=h1)
    # the same path on host 2 is the volume now; the old copy on host 1 is not, and goes
    assert root["installPath"] not in sim(node, h1)["files"] and root["installPath"] in sim(node, h2)["files"]
    assert api.call("StartVmInstance", uuid=vm["uuid"])["inventory"]["hostUuid"] == h2


# --- SharedMountPoint ------------------------------------------------------------------------------------


def smp_zone(api: Api, hosts: int = 2) -> dict:
    env = build_zone(api, hosts=0)
    zone = env["zone"]["uuid"]
    cluster = api.call("CreateCluster", name="smp", zoneUuid=zone, hypervisorType="Simulator")["inventory"]["uuid"]
    smp = api.call("AddSharedMountPointPrimaryStorage", name="smp", url="/mnt/nimbo-smp", zoneUuid=zone)["inventory"]
    assert smp["type"] == "SharedMountPoint"
    api.call("AttachPrimaryStorageToCluster", primaryStorageUuid=smp["uuid"], clusterUuid=cluster)
    api.call("AttachL2NetworkToCluster", l2NetworkUuid=env["l2"]["uuid"], clusterUuid=cluster)
    env["smp"] = smp
    env["hosts"] = [
        api.call("AddSimulatorHost", name=f"s{i}", managementIp=f"10.8.0.{i + 1}", clusterUuid=cluster,
                 cpuCapacity=8 * 2600, memoryCapacity=16 << 30)["inventory"]
        for i in range(hosts)
    ]
    return env


def test_shared_mount_point_one_pool_and_start_anywhere(node: Running, api: Api) -> None:
    env = smp_zone(api)
    smp = env["smp"]["uuid"]
    h1, h2 = (h["uuid"] for h in env["hosts"])
    pool = api.query("QueryPrimaryStorage", ("uuid", "=", smp))[0]
    assert pool["totalCapacity"] == 1 << 40 and pool["availableCapacity"] == 1 << 40

    vm = vm_of(api, env, hostUuid=h1)
    root = vm["allVolumes"][0]
    assert root["primaryStorageUuid"] == smp and root["installPath"].startswith("/mnt/nimbo-smp/rootVolumes/")
    assert api.query("QueryLocalStorageResourceRef", ("resourceUuid", "=", root["uuid"])) == []
    assert api.query("QueryPrimaryStorage", ("uuid", "=", smp))[0]["availableCapacity"] == (1 << 40) - root["size"]
    assert root["installPath"] in sim(node, h1)["sharedFiles"] and sim(node, h1)["files"] == []

    # a data volume made while the VM is stopped, and a snapshot, on the shared storage
    api.call("StopVmInstance", uuid=vm["uuid"])
    vol = api.call("CreateDataVolume", name="d", diskOfferingUuid=env["disk"]["uuid"])["inventory"]
    vol = api.call("AttachDataVolumeToVm", vmInstanceUuid=vm["uuid"], volumeUuid=vol["uuid"])["inventory"]
    assert vol["primaryStorageUuid"] == smp and vol["installPath"] in sim(node, h2)["sharedFiles"]
    snap = api.call("CreateVolumeSnapshot", volumeUuid=root["uuid"], name="s")["inventory"]
    assert snap["primaryStorageUuid"] == smp
    assert api.query("QueryPrimaryStorage", ("uuid", "=", smp))[0]["availableCapacity"] == (
        (1 << 40) - root["size"] - vol["size"] - snap["size"])

    # stopped on host 1, started on host 2 from the same files: nothing copied
    started = api.call("StartVmInstance", uuid=vm["uuid"], hostUuid=h2)["inventory"]
    assert started["state"] == "Running" and started["hostUuid"] == h2
    top = volume(api, root["uuid"])["installPath"]
    assert sim(node, h2)["disks"][vm["uuid"]] == [top, vol["installPath"]]
    assert sim(node, h2)["files"] == [] and sim(node, h1)["files"] == []
    assert "LocalStorage only" in fails(api, "LocalStorageMigrateVolume", volumeUuid=root["uuid"], destHostUuid=h1)

    # without a hostUuid it starts where it ran last
    api.call("StopVmInstance", uuid=vm["uuid"])
    assert api.call("StartVmInstance", uuid=vm["uuid"])["inventory"]["hostUuid"] == h2

    # destroyed for good: the volume and its snapshot leave the shared storage
    api.call("UpdateGlobalConfig", category="vm", name="deletionPolicy", value="Direct")
    api.call("DestroyVmInstance", uuid=vm["uuid"])
    shared = sim(node, h1)["sharedFiles"]
    assert top not in shared and snap["primaryStorageInstallPath"] not in shared
    assert api.query("QueryVolumeSnapshot", ("uuid", "=", snap["uuid"])) == []


# --- MigrateVm ----------------------------------------------------------------------------------------------


def test_migrate_vm_live_between_shared_storage_hosts(node: Running, api: Api) -> None:
    env = smp_zone(api, hosts=3)
    h1, h2, h3 = (h["uuid"] for h in env["hosts"])
    vm = vm_of(api, env, hostUuid=h1)
    mem = vm["memorySize"]
    free2 = host(api, h2)["availableMemoryCapacity"]

    assert {h["uuid"] for h in api.call("GetVmMigrationCandidateHosts", vmInstanceUuid=vm["uuid"])["inventories"]} \
        == {h2, h3}
    moved = api.call("MigrateVm", vmInstanceUuid=vm["uuid"], hostUuid=h2)["inventory"]
    assert moved["state"] == "Running" and moved["hostUuid"] == h2
    assert vm["uuid"] in sim(node, h2)["domains"] and vm["uuid"] not in sim(node, h1)["domains"]
    assert sim(node, h2)["migrations"][-1]["from"] == h1
    assert host(api, h2)["availableMemoryCapacity"] == free2 - mem
    assert host(api, h1)["availableMemoryCapacity"] == host(api, h1)["totalMemoryCapacity"]

    # without hostUuid a host is chosen
    again = api.call("MigrateVm", vmInstanceUuid=vm["uuid"])["inventory"]
    assert again["hostUuid"] in (h1, h3) and again["state"] == "Running"

    # CPU models differ and the guest sees its host's CPU: refused with the spec's warning
    current = again["hostUuid"]
    other = h3 if current == h1 else h1
    agent(node, "/simulator/facts", hostUuid=other, cpuModel="Other CPU @ 2.0GHz")
    api.call("ReconnectHost", uuid=other)
    api.call("UpdateGlobalConfig", category="kvm", name="vm.cpuMode", value="host-model")
    err = fails(api, "MigrateVm", vmInstanceUuid=vm["uuid"], hostUuid=other)
    assert ("setting this value to host-model or host-passthrough may break live migration if CPU models are "
            "different on two hosts") in err
    candidates = {h["uuid"] for h in api.call("GetVmMigrationCandidateHosts", vmInstanceUuid=vm["uuid"])["inventories"]}
    assert other not in candidates and h2 in candidates
    api.call("UpdateGlobalConfig", category="kvm", name="vm.cpuMode", value="host-passthrough")
    assert "host-passthrough" in fails(api, "MigrateVm", vmInstanceUuid=vm["uuid"], hostUuid=other)
    api.call("UpdateGlobalConfig", category="kvm", name="vm.cpuMode", value="none")
    assert api.call("MigrateVm", vmInstanceUuid=vm["uuid"], hostUuid=other)["inventory"]["hostUuid"] == other

    # a failing migration leaves the VM running where it was
    agent(node, "/simulator/fault", hostUuid=other, path="/vm/migrate", error="connection refused")
    assert "connection refused" in fails(api, "MigrateVm", vmInstanceUuid=vm["uuid"], hostUuid=h2)
    row = api.query("QueryVmInstance", ("uuid", "=", vm["uuid"]))[0]
    assert row["state"] == "Running" and row["hostUuid"] == other
    assert host(api, h2)["availableMemoryCapacity"] == host(api, h2)["totalMemoryCapacity"]

    # only a running VM migrates live
    api.call("StopVmInstance", uuid=vm["uuid"])
    assert "Running" in fails(api, "MigrateVm", vmInstanceUuid=vm["uuid"], hostUuid=h2)


def test_migrate_vm_on_local_storage_points_to_volume_migration(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=2)
    h1, h2 = (h["uuid"] for h in env["hosts"])
    vm = vm_of(api, env, hostUuid=h1)
    err = fails(api, "MigrateVm", vmInstanceUuid=vm["uuid"], hostUuid=h2)
    assert "LocalStorage" in err and "LocalStorageMigrateVolume" in err
    # the way to move it: stop, migrate the root volume, start
    api.call("StopVmInstance", uuid=vm["uuid"])
    api.call("LocalStorageMigrateVolume", volumeUuid=vm["rootVolumeUuid"], destHostUuid=h2)
    assert api.call("StartVmInstance", uuid=vm["uuid"])["inventory"]["hostUuid"] == h2
