"""Resource lifecycle on the simulator: deletion policies (1.0 §8), the expunger, recover/expunge
of VMs, images and data volumes, the garbage collector (1.2 §4) and API timeouts (1.2 §3)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Api, Running, _fresh_postgres, build_zone

# --- helpers -------------------------------------------------------------------------------------


def _vm(api: Api, env: dict, name: str = "vm", **extra: Any) -> dict:
    l3s = extra.pop("l3NetworkUuids", [env["l3"]["uuid"]])
    return api.call("CreateVmInstance", name=name, imageUuid=env["image"]["uuid"],
                    instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=l3s, **extra)["inventory"]


def _agent(node: Running, command: str, /, **body: Any) -> dict:
    data = node.agent_call(command, body)
    assert data["success"], data
    return data


def agent_state(node: Running, host_uuid: str) -> dict:
    """The simulated host as its agent sees it: domains and the simulated storage's files."""
    return _agent(node, "/simulator/state", hostUuid=host_uuid)


def fault(node: Running, host_uuid: str, path: str = "*", **kind: Any) -> None:
    _agent(node, "/simulator/fault", hostUuid=host_uuid, path=path, **kind)


def clear_faults(node: Running, host_uuid: str = "*") -> None:
    _agent(node, "/simulator/fault", hostUuid=host_uuid, clear=True)


def gc_entries(api: Api, **filters: str) -> list[dict]:
    r = httpx.get(f"{api.base}/gc", params=filters, headers={"Authorization": f"OAuth {api.session}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["inventories"]


def wait_for(what: Callable[[], Any], timeout: float = 15.0, every: float = 0.2) -> Any:
    end = time.time() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def set_config(api: Api, category: str, **values: Any) -> None:
    for name, value in values.items():
        api.call("UpdateGlobalConfig", category=category, name=name, value=str(value))


def host_of(api: Api, uuid: str) -> dict:
    return api.query("QueryHost", ("uuid", "=", uuid))[0]


def ps_available(api: Api) -> int:
    return api.query("QueryPrimaryStorage")[0]["availableCapacity"]


def own_node(path: Path, **kw: Any) -> Running:
    db = kw.pop("db_url", None)
    if db is None and os.environ.get("NIMBOSTACK_TEST_DB"):
        db = _fresh_postgres(os.environ["NIMBOSTACK_TEST_DB"])
    return Running(path, db, **kw)


def login(node: Running) -> Api:
    client = Api(node.url)
    client.login()
    return client


@pytest.fixture
def bg_node(tmp_path: Path) -> Iterator[Running]:
    """A node whose background loops run: pings, the expunger, the GC poll."""
    running = own_node(tmp_path / "bg", background=True)
    yield running
    running.stop()


@pytest.fixture
def bg_api(bg_node: Running) -> Api:
    return login(bg_node)


def sftp_store(api: Api, node: Running, root: Path, name: str = "bs") -> dict:
    """A backup storage kept by the simulator agent, with real files under ``root``."""
    bs = api.call("AddSftpBackupStorage", name=name, hostname="127.0.0.1", username="root", password="x",
                  url=str(root), systemTags=[f"agentPort::{node.agent_port}"])["inventory"]
    return bs


def image_file(tmp_path: Path) -> Path:
    src = tmp_path / "img.raw"
    src.write_bytes(b"\0" * 4096)
    return src


def copies(api: Api, image_uuid: str) -> dict[str, dict]:
    (img,) = api.query("QueryImage", ("uuid", "=", image_uuid))
    return {r["backupStorageUuid"]: r for r in img["backupStorageRefs"]}


# --- VM deletion policy --------------------------------------------------------------------------


def test_delay_destroy_frees_host_and_ip_keeps_volume_until_expunged(bg_api: Api, bg_node: Running) -> None:
    api, node = bg_api, bg_node
    env = build_zone(api)
    free = ps_available(api)
    vm = _vm(api, env)
    (nic,) = vm["vmNics"]
    (root,) = vm["allVolumes"]
    host = vm["hostUuid"]
    assert root["installPath"] in agent_state(node, host)["files"]
    api.call("DestroyVmInstance", uuid=vm["uuid"])
    (gone,) = api.query("QueryVmInstance", ("uuid", "=", vm["uuid"]))
    assert gone["state"] == "Destroyed" and gone["vmNics"] == [] and "hostUuid" not in gone
    h = host_of(api, host)
    assert h["availableMemoryCapacity"] == h["totalMemoryCapacity"]
    assert h["availableCpuCapacity"] == h["totalCpuCapacity"]
    assert vm["uuid"] not in agent_state(node, host)["domains"]
    # the IP is free at once: another VM may take it
    other = _vm(api, env, name="other", systemTags=[f"staticIp::{env['l3']['uuid']}::{nic['ip']}"])
    assert other["vmNics"][0]["ip"] == nic["ip"]
    # the root volume keeps its file and its storage until expunged
    (vol,) = api.query("QueryVolume", ("uuid", "=", root["uuid"]))
    assert vol["status"] == "Ready"
    assert ps_available(api) == free - 2 * root["size"]
    assert root["installPath"] in agent_state(node, host)["files"]
    # the expunger: after expungePeriod, scanning every expungeInterval
    set_config(api, "vm", expungePeriod=1, expungeInterval=1)
    wait_for(lambda: api.query("QueryVmInstance", ("uuid", "=", vm["uuid"])) == [])
    assert api.query("QueryVolume", ("uuid", "=", root["uuid"])) == []
    assert root["installPath"] not in agent_state(node, host)["files"]
    assert ps_available(api) == free - root["size"]  # only the other VM's root volume
    assert [v["name"] for v in api.query("QueryVmInstance")] == ["other"]


def test_never_is_never_expunged_and_the_policy_in_force_decides(bg_api: Api) -> None:
    api = bg_api
    env = build_zone(api)
    set_config(api, "vm", deletionPolicy="Never", expungePeriod=1, expungeInterval=1)
    vm = _vm(api, env)
    api.call("DestroyVmInstance", uuid=vm["uuid"])
    time.sleep(3.5)  # several expunger rounds
    (kept,) = api.query("QueryVmInstance", ("uuid", "=", vm["uuid"]))
    assert kept["state"] == "Destroyed"
    assert api.query("QueryVolume", ("uuid", "=", vm["rootVolumeUuid"]))
    # the operator switches to Delay: what is past its period goes on the next round
    set_config(api, "vm", deletionPolicy="Delay")
    wait_for(lambda: api.query("QueryVmInstance", ("uuid", "=", vm["uuid"])) == [])
    assert api.query("QueryVolume", ("uuid", "=", vm["rootVolumeUuid"])) == []


def test_direct_destroy_removes_everything_at_once(api: Api, node: Running) -> None:
    env = build_zone(api)
    free = ps_available(api)
    set_config(api, "vm", deletionPolicy="Direct")
    vm = _vm(api, env)
    (root,) = vm["allVolumes"]
    api.call("DestroyVmInstance", uuid=vm["uuid"])
    assert api.query("QueryVmInstance", ("uuid", "=", vm["uuid"])) == []
    assert api.query("QueryVolume", ("uuid", "=", root["uuid"])) == []
    assert api.query("QueryVmNic") == []
    assert ps_available(api) == free
    assert root["installPath"] not in agent_state(node, vm["hostUuid"])["files"]
    h = host_of(api, vm["hostUuid"])
    assert h["availableMemoryCapacity"] == h["totalMemoryCapacity"]


def test_destroy_detaches_data_volumes_or_deletes_them_when_configured(api: Api) -> None:
    env = build_zone(api)
    vm = _vm(api, env)
    keep = api.call("CreateDataVolume", name="keep", diskOfferingUuid=env["disk"]["uuid"])["inventory"]
    api.call("AttachDataVolumeToVm", vmInstanceUuid=vm["uuid"], volumeUuid=keep["uuid"])
    api.call("DestroyVmInstance", uuid=vm["uuid"])
    (vol,) = api.query("QueryVolume", ("uuid", "=", keep["uuid"]))
    assert "vmInstanceUuid" not in vol and vol["status"] == "Ready"
    set_config(api, "vm", **{"dataVolume.deleteOnVmDestroy": "true"})
    vm2 = _vm(api, env, name="vm2")
    drop = api.call("CreateDataVolume", name="drop", diskOfferingUuid=env["disk"]["uuid"])["inventory"]
    api.call("AttachDataVolumeToVm", vmInstanceUuid=vm2["uuid"], volumeUuid=drop["uuid"])
    api.call("DestroyVmInstance", uuid=vm2["uuid"])
    (vol,) = api.query("QueryVolume", ("uuid", "=", drop["uuid"]))
    assert vol["status"] == "Deleted" and "vmInstanceUuid" not in vol  # volume/deletionPolicy: Delay


# --- recover ------------------------------------------------------------------------------------


def _second_l3(api: Api, env: dict) -> dict:
    l3 = api.call("CreateL3Network", name="l3b", l2NetworkUuid=env["l2"]["uuid"])["inventory"]
    api.call("AddIpRange", l3NetworkUuid=l3["uuid"], name="r2", startIp="198.19.0.10", endIp="198.19.0.200",
             netmask="255.255.255.0", gateway="198.19.0.1")
    return l3


def test_recover_vm_gets_its_networks_back_and_starts(api: Api, node: Running) -> None:
    env = build_zone(api)
    l3b = _second_l3(api, env)
    vm = _vm(api, env, l3NetworkUuids=[env["l3"]["uuid"], l3b["uuid"]])
    before = {n["l3NetworkUuid"]: n for n in vm["vmNics"]}
    api.call("DestroyVmInstance", uuid=vm["uuid"])
    free = host_of(api, vm["hostUuid"])["availableMemoryCapacity"]
    # the release notes' spelling
    out = api.call("RecoverVmInstance", vmInstanceUuid=vm["uuid"])["inventory"]
    assert out["state"] == "Stopped" and out["rootVolumeUuid"] == vm["rootVolumeUuid"]
    after = {n["l3NetworkUuid"]: n for n in out["vmNics"]}
    assert set(after) == set(before)
    for l3, nic in after.items():  # its old addresses were free: it has them again
        assert (nic["ip"], nic["mac"], nic["deviceId"]) == (before[l3]["ip"], before[l3]["mac"],
                                                            before[l3]["deviceId"])
    assert [v["uuid"] for v in out["allVolumes"]] == [vm["rootVolumeUuid"]]
    assert host_of(api, vm["hostUuid"])["availableMemoryCapacity"] == free  # Stopped holds nothing
    started = api.call("StartVmInstance", uuid=vm["uuid"])["inventory"]
    assert started["state"] == "Running" and started["hostUuid"] == vm["hostUuid"]
    assert vm["uuid"] in agent_state(node, vm["hostUuid"])["domains"]
    # the API table's spelling; only a Destroyed VM is recovered
    err = api.fails("RecoverVmInstance", uuid=vm["uuid"])
    assert err["code"] == "SYS.1005" and "Destroyed" in err["details"]


def test_recover_vm_fails_clearly_when_its_static_ip_is_taken(api: Api) -> None:
    env = build_zone(api)
    ip = "198.18.0.77"
    vm = _vm(api, env, systemTags=[f"staticIp::{env['l3']['uuid']}::{ip}"])
    api.call("DestroyVmInstance", uuid=vm["uuid"])
    thief = _vm(api, env, name="thief", systemTags=[f"staticIp::{env['l3']['uuid']}::{ip}"])
    err = api.fails("RecoverVmInstance", uuid=vm["uuid"])
    assert err["code"] == "L3.1001" and ip in err["details"] and thief["uuid"] in err["details"]
    (still,) = api.query("QueryVmInstance", ("uuid", "=", vm["uuid"]))
    assert still["state"] == "Destroyed" and still["vmNics"] == []
    api.call("DestroyVmInstance", uuid=thief["uuid"])
    out = api.call("RecoverVmInstance", uuid=vm["uuid"])["inventory"]
    assert out["vmNics"][0]["ip"] == ip


def test_data_volume_delete_recover_expunge(api: Api, node: Running) -> None:
    env = build_zone(api)
    vm = _vm(api, env)
    vol = api.call("CreateDataVolume", name="data", diskOfferingUuid=env["disk"]["uuid"])["inventory"]
    vol = api.call("AttachDataVolumeToVm", vmInstanceUuid=vm["uuid"], volumeUuid=vol["uuid"])["inventory"]
    api.call("DetachDataVolumeFromVm", uuid=vol["uuid"])
    used = ps_available(api)
    api.call("DeleteDataVolume", uuid=vol["uuid"])
    (deleted,) = api.query("QueryVolume", ("uuid", "=", vol["uuid"]))
    assert deleted["status"] == "Deleted"
    assert ps_available(api) == used  # still counted
    assert vol["installPath"] in agent_state(node, vm["hostUuid"])["files"]
    err = api.fails("AttachDataVolumeToVm", vmInstanceUuid=vm["uuid"], volumeUuid=vol["uuid"])
    assert err["code"] == "SYS.1005"
    # the release notes' spelling (uuid=) and the alias volumeUuid=
    assert api.call("RecoverDataVolume", uuid=vol["uuid"])["inventory"]["status"] == "Ready"
    api.call("AttachDataVolumeToVm", vmInstanceUuid=vm["uuid"], volumeUuid=vol["uuid"])
    api.call("DetachDataVolumeFromVm", uuid=vol["uuid"])
    api.call("DeleteDataVolume", uuid=vol["uuid"])
    api.call("RecoverDataVolume", volumeUuid=vol["uuid"])
    err = api.fails("ExpungeDataVolume", uuid=vol["uuid"])
    assert err["code"] == "SYS.1005" and "Deleted" in err["details"]
    api.call("DeleteDataVolume", uuid=vol["uuid"])
    api.call("ExpungeDataVolume", volumeUuid=vol["uuid"])
    assert api.query("QueryVolume", ("uuid", "=", vol["uuid"])) == []
    assert ps_available(api) == used + vol["size"]
    assert vol["installPath"] not in agent_state(node, vm["hostUuid"])["files"]
    # a never-instantiated volume follows the policy too
    empty = api.call("CreateDataVolume", name="empty", diskOfferingUuid=env["disk"]["uuid"])["inventory"]
    api.call("DeleteDataVolume", uuid=empty["uuid"])
    assert api.call("RecoverDataVolume", uuid=empty["uuid"])["inventory"]["status"] == "NotInstantiated"
    err = api.fails("RecoverDataVolume", uuid=vm["rootVolumeUuid"])
    assert "RecoverVmInstance" in err["details"]


def test_image_delete_recover_expunge_per_backup_storage(api: Api, node: Running, tmp_path: Path) -> None:
    bs1 = sftp_store(api, node, tmp_path / "bs1", "bs1")
    bs2 = sftp_store(api, node, tmp_path / "bs2", "bs2")
    img = api.call("AddImage", name="img", url=str(image_file(tmp_path)), format="raw",
                   backupStorageUuids=[bs1["uuid"], bs2["uuid"]])["inventory"]
    files = {u: Path(r["installPath"]) for u, r in copies(api, img["uuid"]).items()}
    assert all(f.exists() for f in files.values())
    # delete on one store: the image stays Ready
    api.call("DeleteImage", uuid=img["uuid"], backupStorageUuids=[bs1["uuid"]])
    refs = copies(api, img["uuid"])
    assert refs[bs1["uuid"]]["status"] == "Deleted" and refs[bs2["uuid"]]["status"] == "Ready"
    assert api.query("QueryImage", ("uuid", "=", img["uuid"]))[0]["status"] == "Ready"
    api.call("RecoverImage", imageUuid=img["uuid"], backupStorageUuids=[bs1["uuid"]])
    assert {r["status"] for r in copies(api, img["uuid"]).values()} == {"Ready"}
    # delete everywhere: Deleted, files kept
    api.call("DeleteImage", uuid=img["uuid"])
    (deleted,) = api.query("QueryImage", ("uuid", "=", img["uuid"]))
    assert deleted["status"] == "Deleted" and all(f.exists() for f in files.values())
    # recover on bs2 only (alias uuid=): Ready again, the bs1 copy stays Deleted
    out = api.call("RecoverImage", uuid=img["uuid"], backupStorageUuids=[bs2["uuid"]])["inventory"]
    assert out["status"] == "Ready"
    refs = copies(api, img["uuid"])
    assert refs[bs1["uuid"]]["status"] == "Deleted" and refs[bs2["uuid"]]["status"] == "Ready"
    # expunge the bs1 copy: its file goes
    api.call("ExpungeImage", imageUuid=img["uuid"], backupStorageUuids=[bs1["uuid"]])
    assert set(copies(api, img["uuid"])) == {bs2["uuid"]}
    assert not files[bs1["uuid"]].exists() and files[bs2["uuid"]].exists()
    err = api.fails("ExpungeImage", imageUuid=img["uuid"])
    assert err["code"] == "SYS.1005" and "DeleteImage" in err["details"]
    err = api.fails("RecoverImage", imageUuid=img["uuid"], backupStorageUuids=[bs1["uuid"]])
    assert err["code"] == "SYS.1007" and bs1["uuid"] in err["details"]
    api.call("DeleteImage", uuid=img["uuid"])
    api.call("ExpungeImage", uuid=img["uuid"])
    assert api.query("QueryImage", ("uuid", "=", img["uuid"])) == []
    assert not files[bs2["uuid"]].exists()
    # Direct: gone at once with its file
    set_config(api, "image", deletionPolicy="Direct")
    img2 = api.call("AddImage", name="img2", url=str(image_file(tmp_path)), format="raw",
                    backupStorageUuids=[bs1["uuid"]])["inventory"]
    path = Path(img2["backupStorageRefs"][0]["installPath"])
    assert path.exists()
    api.call("DeleteImage", uuid=img2["uuid"])
    assert api.query("QueryImage", ("uuid", "=", img2["uuid"])) == [] and not path.exists()


def test_a_deleted_image_cannot_make_vms_until_recovered(api: Api) -> None:
    env = build_zone(api)
    api.call("DeleteImage", uuid=env["image"]["uuid"])
    err = api.fails("CreateVmInstance", name="x", imageUuid=env["image"]["uuid"],
                    instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]])
    assert err["code"] == "SYS.1005" and "Deleted" in err["details"]
    api.call("RecoverImage", imageUuid=env["image"]["uuid"])
    assert _vm(api, env)["state"] == "Running"


def test_expunger_removes_deleted_images_and_volumes(bg_api: Api, bg_node: Running, tmp_path: Path) -> None:
    api, node = bg_api, bg_node
    env = build_zone(api)
    vm = _vm(api, env)
    vol = api.call("CreateDataVolume", name="data", diskOfferingUuid=env["disk"]["uuid"])["inventory"]
    vol = api.call("AttachDataVolumeToVm", vmInstanceUuid=vm["uuid"], volumeUuid=vol["uuid"])["inventory"]
    api.call("DetachDataVolumeFromVm", uuid=vol["uuid"])
    bs = sftp_store(api, node, tmp_path / "bs")
    img = api.call("AddImage", name="img", url=str(image_file(tmp_path)), format="raw",
                   backupStorageUuids=[bs["uuid"]])["inventory"]
    path = Path(img["backupStorageRefs"][0]["installPath"])
    api.call("DeleteDataVolume", uuid=vol["uuid"])
    api.call("DeleteImage", uuid=img["uuid"])
    set_config(api, "volume", expungePeriod=1, expungeInterval=1)
    set_config(api, "image", expungePeriod=1, expungeInterval=1)
    wait_for(lambda: api.query("QueryVolume", ("uuid", "=", vol["uuid"])) == [])
    wait_for(lambda: api.query("QueryImage", ("uuid", "=", img["uuid"])) == [])
    assert not path.exists()
    assert vol["installPath"] not in agent_state(node, vm["hostUuid"])["files"]


# --- garbage collector -------------------------------------------------------------------------


def test_destroy_on_an_unreachable_host_succeeds_and_the_gc_finishes_on_reconnect(api: Api, node: Running) -> None:
    env = build_zone(api)
    host = env["hosts"][0]["uuid"]
    vm = _vm(api, env)
    (root,) = vm["allVolumes"]
    vol = api.call("CreateDataVolume", name="data", diskOfferingUuid=env["disk"]["uuid"])["inventory"]
    vol = api.call("AttachDataVolumeToVm", vmInstanceUuid=vm["uuid"], volumeUuid=vol["uuid"])["inventory"]
    api.call("DetachDataVolumeFromVm", uuid=vol["uuid"])
    fault(node, host, unreachable=True)
    started = time.time()
    api.call("DestroyVmInstance", uuid=vm["uuid"])
    assert time.time() - started < 5
    assert api.query("QueryVmInstance", ("uuid", "=", vm["uuid"]))[0]["state"] == "Destroyed"
    h = host_of(api, host)
    assert h["availableMemoryCapacity"] == h["totalMemoryCapacity"]
    (entry,) = gc_entries(api, resourceUuid=vm["uuid"])
    assert entry["status"] == "Pending" and entry["name"] == "destroy-vm" and entry["hostUuid"] == host
    assert entry["path"] == "/vm/destroy" and "Cannot reach the host agent" in entry["reason"]
    assert vm["uuid"] in agent_state(node, host)["domains"]  # still there: the host did not hear us
    # the host is seen Disconnected now; expunging and deleting still succeed
    assert api.fails("ReconnectHost", uuid=host)["code"] == "HOST.1002"
    assert host_of(api, host)["status"] == "Disconnected"
    api.call("ExpungeVmInstance", uuid=vm["uuid"])
    set_config(api, "volume", deletionPolicy="Direct")
    api.call("DeleteDataVolume", uuid=vol["uuid"])
    assert api.query("QueryVmInstance", ("uuid", "=", vm["uuid"])) == []
    assert api.query("QueryVolume", ("uuid", "=", vol["uuid"])) == []
    pending = gc_entries(api, status="Pending")
    assert sorted(e["name"] for e in pending) == ["delete-volume-file", "delete-volume-file", "destroy-vm"]
    files = agent_state(node, host)["files"]
    assert root["installPath"] in files and vol["installPath"] in files
    # the host comes back
    clear_faults(node, host)
    assert api.call("ReconnectHost", uuid=host)["inventory"]["status"] == "Connected"
    assert gc_entries(api, status="Pending") == []
    done = gc_entries(api, status="Done")
    assert len(done) == 3 and all(e["attempts"] == 1 for e in done)
    state = agent_state(node, host)
    assert vm["uuid"] not in state["domains"]
    assert root["installPath"] not in state["files"] and vol["installPath"] not in state["files"]


def test_gc_entry_survives_a_management_node_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = own_node(data)
    try:
        api = login(first)
        env = build_zone(api)
        host = env["hosts"][0]["uuid"]
        vm = _vm(api, env)
        fault(first, host, unreachable=True)
        api.call("DestroyVmInstance", uuid=vm["uuid"])
        (entry,) = gc_entries(api, status="Pending")
    finally:
        first.stop()
    ports = {"port": first.port, "agent_port": first.agent_port, "db_url": first.db_url}
    # restarted while the host's agent is still away (nothing listens where it was)
    second = own_node(data, port=first.port, db_url=first.db_url)
    try:
        api = login(second)
        assert host_of(api, host)["status"] == "Disconnected"
        (still,) = gc_entries(api, status="Pending")
        assert still["uuid"] == entry["uuid"]
    finally:
        second.stop()
    # and again with the agent back: the start-up reconnect runs the GC
    third = own_node(data, **ports)
    try:
        api = login(third)
        assert host_of(api, host)["status"] == "Connected"
        (done,) = gc_entries(api, status="Done")
        assert done["uuid"] == entry["uuid"] and done["attempts"] >= 1
        assert vm["uuid"] not in agent_state(third, host)["domains"]
        assert api.query("QueryVmInstance", ("uuid", "=", vm["uuid"]))[0]["state"] == "Destroyed"
    finally:
        third.stop()


def test_gc_poll_runs_pending_work_without_a_reconnect(bg_api: Api, bg_node: Running) -> None:
    api, node = bg_api, bg_node
    env = build_zone(api)
    host = env["hosts"][0]["uuid"]
    vm = _vm(api, env)
    set_config(api, "gc", interval=1)
    fault(node, host, path="/vm/destroy", unreachable=True)  # only this command fails: pings still answer
    api.call("DestroyVmInstance", uuid=vm["uuid"])
    assert gc_entries(api, resourceUuid=vm["uuid"])[0]["status"] == "Pending"
    (entry,) = wait_for(lambda: [e for e in gc_entries(api, resourceUuid=vm["uuid"]) if e["attempts"] >= 1])
    assert entry["status"] == "Pending"  # tried by the poll, still unreachable
    clear_faults(node)
    wait_for(lambda: gc_entries(api, resourceUuid=vm["uuid"])[0]["status"] == "Done")
    assert vm["uuid"] not in agent_state(node, host)["domains"]


def test_gc_does_not_destroy_a_recovered_vm_running_again(api: Api, node: Running) -> None:
    env = build_zone(api)
    host = env["hosts"][0]["uuid"]
    vm = _vm(api, env)
    fault(node, host, path="/vm/destroy", unreachable=True)
    api.call("DestroyVmInstance", uuid=vm["uuid"])
    api.call("RecoverVmInstance", uuid=vm["uuid"])
    clear_faults(node)
    assert api.call("StartVmInstance", uuid=vm["uuid"])["inventory"]["hostUuid"] == host
    api.call("ReconnectHost", uuid=host)
    (entry,) = gc_entries(api, resourceUuid=vm["uuid"])
    assert entry["status"] == "Done" and "not needed" in entry["reason"]
    assert agent_state(node, host)["domains"][vm["uuid"]] == "Running"


def test_deleting_the_host_settles_its_gc_entries(api: Api, node: Running) -> None:
    env = build_zone(api)
    host = env["hosts"][0]["uuid"]
    vm = _vm(api, env)
    fault(node, host, unreachable=True)
    api.call("DestroyVmInstance", uuid=vm["uuid"])
    assert [e["status"] for e in gc_entries(api)] == ["Pending"]
    api.call("DeleteHost", uuid=host)
    (entry,) = gc_entries(api)
    assert entry["status"] == "Done" and "deleted" in entry["reason"]
    # expunging a VM whose host is gone leaves no work behind
    api.call("ExpungeVmInstance", uuid=vm["uuid"])
    assert len(gc_entries(api)) == 1 and api.query("QueryVmInstance") == []


def test_gc_endpoint_needs_an_admin_session(api: Api) -> None:
    r = httpx.get(f"{api.base}/gc", timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "ID.1001"
    r = httpx.get(f"{api.base}/gc", params={"session": api.session}, timeout=30)
    assert r.status_code == 200 and r.json()["inventories"] == []


# --- API timeouts -------------------------------------------------------------------------------


def _assert_nothing_left(api: Api, node: Running, env: dict, free: int) -> None:
    host = env["hosts"][0]["uuid"]
    assert api.query("QueryVmInstance") == []
    assert api.query("QueryVmNic") == []
    assert api.query("QueryVolume") == []
    h = host_of(api, host)
    assert h["availableMemoryCapacity"] == h["totalMemoryCapacity"]
    assert h["availableCpuCapacity"] == h["totalCpuCapacity"]
    assert ps_available(api) == free
    time.sleep(2.5)  # the slow command's delay is over: the agent refused to run it late
    state = agent_state(node, host)
    assert state["domains"] == {}
    assert [f for f in state["files"] if "rootVolumes" in f] == []


def test_a_slow_agent_makes_the_api_time_out_and_roll_back(api: Api, node: Running) -> None:
    env = build_zone(api)
    host = env["hosts"][0]["uuid"]
    free = ps_available(api)
    out = api.call("UpdateGlobalConfig", category="apiTimeout", name="CreateVmInstance", value="1s")["inventory"]
    assert out["name"] == "org.zstack.header.vm.APICreateVmInstanceMsg" and out["value"] == "1s"
    fault(node, host, path="/vm/start", delay=3)
    started = time.time()
    err = api.fails("CreateVmInstance", name="slow", imageUuid=env["image"]["uuid"],
                    instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]])
    assert err["code"] == "SYS.1003"
    assert time.time() - started < 3
    _assert_nothing_left(api, node, env, free)
    # the configured timeouts are listed; resetting one brings the default back
    (cfg,) = api.query("QueryGlobalConfig", ("category", "=", "apiTimeout"))
    assert cfg["name"] == "org.zstack.header.vm.APICreateVmInstanceMsg" and cfg["defaultValue"] == "30m"
    got = api.call("GetGlobalConfig", category="apiTimeout", name="APICreateVmInstanceMsg")["inventory"]
    assert got["value"] == "1s"
    api.call("UpdateGlobalConfig", category="apiTimeout", name="org.zstack.header.vm.APICreateVmInstanceMsg")
    assert api.query("QueryGlobalConfig", ("category", "=", "apiTimeout")) == []
    fault(node, host, path="/vm/start", delay=1.5)
    assert _vm(api, env)["state"] == "Running"


def test_a_slow_step_before_the_start_rolls_back_the_volumes_too(api: Api, node: Running) -> None:
    env = build_zone(api)
    host = env["hosts"][0]["uuid"]
    free = ps_available(api)
    fault(node, host, path="/storage/local/create-root", delay=2)
    err = api.fails("CreateVmInstance", name="slow", imageUuid=env["image"]["uuid"], timeout=1000,
                    instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]])
    assert err["code"] == "SYS.1003"
    _assert_nothing_left(api, node, env, free)


def test_api_timeout_config_is_validated(api: Api) -> None:
    err = api.fails("UpdateGlobalConfig", category="apiTimeout", name="NoSuchApi", value="1s")
    assert err["code"] == "SYS.1007" and "NoSuchApi" in err["details"]
    err = api.fails("UpdateGlobalConfig", category="apiTimeout", name="org.zstack.header.vm.APINopeMsg", value="1s")
    assert err["code"] == "SYS.1007"
    for bad in ("soon", "0s", "-5m"):
        err = api.fails("UpdateGlobalConfig", category="apiTimeout", name="AddImage", value=bad)
        assert err["code"] == "SYS.1007"
    for name, value in (("org.zstack.header.image.APIAddImageMsg", "6h"), ("StartVmInstance", "10m"),
                        ("APIStopVmInstanceMsg", "30s")):
        api.call("UpdateGlobalConfig", category="apiTimeout", name=name, value=value)
    names = {c["name"]: c["value"] for c in api.query("QueryGlobalConfig", ("category", "=", "apiTimeout"))}
    assert names == {"org.zstack.header.image.APIAddImageMsg": "6h",
                     "org.zstack.header.vm.APIStartVmInstanceMsg": "10m",
                     "org.zstack.header.vm.APIStopVmInstanceMsg": "30s"}


def test_zstack_properties_sets_api_timeouts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "zstack.properties").write_text(
        "# operator's timeouts\n"
        "ApiTimeout.org.zstack.header.image.APIAddImageMsg = org.zstack.header.storage.backup.DownloadImageMsg, "
        "org.zstack.storage.backup.sftp.SftpBackupStorageCommands$DownloadCmd; 6h\n"
        "ApiTimeout.org.zstack.header.vm.APICreateVmInstanceMsg = org.zstack.header.vm.StartVmMsg; 1s\n"
    )
    node = own_node(data)
    try:
        assert node.platform.timeouts.get("AddImage") == 6 * 3600
        assert node.platform.timeouts.get("org.zstack.header.vm.APICreateVmInstanceMsg") == 1
        api = login(node)
        # the value in force is reported: the file's 6h, not the built-in 3h
        got = api.call("GetGlobalConfig", category="apiTimeout", name="AddImage")["inventory"]
        assert got["value"] == got["defaultValue"] == "6h"
        api.call("UpdateGlobalConfig", category="apiTimeout", name="AddImage", value="2h")
        got = api.call("GetGlobalConfig", category="apiTimeout", name="AddImage")["inventory"]
        assert (got["value"], got["defaultValue"]) == ("2h", "6h")
        env = build_zone(api)
        free = ps_available(api)
        fault(node, env["hosts"][0]["uuid"], path="/vm/start", delay=3)
        err = api.fails("CreateVmInstance", name="slow", imageUuid=env["image"]["uuid"],
                        instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]])
        assert err["code"] == "SYS.1003"
        _assert_nothing_left(api, node, env, free)
        # the global config overrides the file
        api.call("UpdateGlobalConfig", category="apiTimeout", name="CreateVmInstance", value="30s")
        assert node.platform.timeouts.get("CreateVmInstance") == 30
        clear_faults(node)
        assert _vm(api, env)["state"] == "Running"
    finally:
        node.stop()


def test_one_lost_ping_is_not_a_lost_host(api: Api, node: Running) -> None:
    from nimbostack.compute.host import ping_all

    env = build_zone(api)
    host = env["hosts"][0]["uuid"]
    fault(node, host, "/host/ping", unreachable=True, times=1)
    node.run(ping_all(node.platform))
    assert host_of(api, host)["status"] == "Connected"  # the retry answered
    fault(node, host, "/host/ping", unreachable=True, times=2)
    node.run(ping_all(node.platform))
    assert host_of(api, host)["status"] == "Disconnected"  # two in a row: it is gone
    node.run(ping_all(node.platform))  # answering again (autoReconnectOnError): reconnected
    assert host_of(api, host)["status"] == "Connected"
