"""Images from volumes and volumes from images on the simulator: CreateRootVolumeTemplateFromRootVolume,
CreateDataVolumeTemplateFromVolume, CreateRootVolumeTemplateFromVolumeSnapshot,
CreateDataVolumeFromVolumeTemplate, SyncImageSize, GetVolumeSnapshotTree — fields, errors, rollback.
Real qcow2 copies and a VM booted from one: tests/e2e/test_templates.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import Api, Running, build_zone
from tests.integration.test_vm_nics import _account, _vm


def _stopped_vm(api: Api, env: dict[str, Any], name: str = "vm") -> dict[str, Any]:
    vm = _vm(api, env, name)
    return api.call("StopVmInstance", uuid=vm["uuid"])["inventory"]


def _fault(node: Running, host: str, path: str, **fault: Any) -> None:
    node.agent_call("/simulator/fault", {"hostUuid": host, "path": path, **fault})


def _bs_free(api: Api, bs_uuid: str) -> int:
    return int(api.query("QueryBackupStorage", ("uuid", "=", bs_uuid))[0]["availableCapacity"])


def test_template_of_a_stopped_vms_root_volume(node: Running, api: Api) -> None:
    env = build_zone(api)
    api.call("UpdateImage", uuid=env["image"]["uuid"], guestOsType="Debian 12")
    vm = _stopped_vm(api, env)
    root = vm["allVolumes"][0]
    free = _bs_free(api, env["bs"]["uuid"])
    img = api.call("CreateRootVolumeTemplateFromRootVolume", name="tpl", description="d", rootVolumeUuid=root["uuid"],
                   backupStorageUuids=[env["bs"]["uuid"]], userTags=["golden"])["inventory"]
    assert img["name"] == "tpl" and img["description"] == "d"
    assert img["status"] == "Ready" and img["state"] == "Enabled"
    assert img["mediaType"] == "RootVolumeTemplate" and img["format"] == "qcow2" and img["type"] == "zstack"
    assert img["platform"] == "Linux" and img["guestOsType"] == "Debian 12"  # inherited from the VM and its image
    assert img["url"] == f"volume://{root['uuid']}" and img["size"] == root["size"] and img["system"] is False
    (ref,) = img["backupStorageRefs"]
    assert ref["backupStorageUuid"] == env["bs"]["uuid"] and ref["status"] == "Ready"
    assert ref["installPath"] == f"/nimbo/bs/images/{img['uuid']}.qcow2"
    assert _bs_free(api, env["bs"]["uuid"]) == free - img["actualSize"]
    assert [t["tag"] for t in api.query("QueryUserTag", ("resourceUuid", "=", img["uuid"]))] == ["golden"]
    # no store named: the zone's; the platform as asked
    other = api.call("CreateRootVolumeTemplateFromRootVolume", name="t2", rootVolumeUuid=root["uuid"],
                     platform="Windows")["inventory"]
    assert other["platform"] == "Windows" and other["backupStorageRefs"][0]["backupStorageUuid"] == env["bs"]["uuid"]
    # a VM from the captured template
    new = api.call("CreateVmInstance", name="from-tpl", imageUuid=img["uuid"],
                   instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]])["inventory"]
    assert new["state"] == "Running" and new["allVolumes"][0]["rootImageUuid"] == img["uuid"]


def test_root_volume_template_errors(node: Running, api: Api) -> None:
    env = build_zone(api)
    vm = _vm(api, env)
    root = vm["allVolumes"][0]
    err = api.fails("CreateRootVolumeTemplateFromRootVolume", name="t", rootVolumeUuid=root["uuid"])
    assert err["code"] == "SYS.1005" and "Running" in err["details"] and "Stopped" in err["details"]
    err = api.fails("CreateRootVolumeTemplateFromRootVolume", name="t", rootVolumeUuid="0" * 32)
    assert err["code"] == "SYS.1006"
    api.call("StopVmInstance", uuid=vm["uuid"])
    err = api.fails("CreateRootVolumeTemplateFromRootVolume", name="t", rootVolumeUuid=root["uuid"],
                    platform="BeOS")
    assert err["code"] == "SYS.1007"
    # a data volume is not a root volume
    vol = api.call("CreateDataVolume", name="d", diskOfferingUuid=env["disk"]["uuid"])["inventory"]
    api.call("AttachDataVolumeToVm", volumeUuid=vol["uuid"], vmInstanceUuid=vm["uuid"])
    err = api.fails("CreateRootVolumeTemplateFromRootVolume", name="t", rootVolumeUuid=vol["uuid"])
    assert err["code"] == "SYS.1007" and "not a Root volume" in err["details"]
    # backup storage: unknown, disabled, not in the volume's zone
    assert api.fails("CreateRootVolumeTemplateFromRootVolume", name="t", rootVolumeUuid=root["uuid"],
                     backupStorageUuids=["1" * 32])["code"] == "SYS.1006"
    lone = api.call("AddSimulatorBackupStorage", name="lone", url="/nimbo/lone")["inventory"]
    err = api.fails("CreateRootVolumeTemplateFromRootVolume", name="t", rootVolumeUuid=root["uuid"],
                    backupStorageUuids=[lone["uuid"]])
    assert err["code"] == "SYS.1005" and "not attached to zone" in err["details"]
    api.call("ChangeBackupStorageState", uuid=env["bs"]["uuid"], stateEvent="disable")
    err = api.fails("CreateRootVolumeTemplateFromRootVolume", name="t", rootVolumeUuid=root["uuid"],
                    backupStorageUuids=[env["bs"]["uuid"]])
    assert err["code"] == "SYS.1005" and "Disabled" in err["details"]
    err = api.fails("CreateRootVolumeTemplateFromRootVolume", name="t", rootVolumeUuid=root["uuid"])
    assert err["code"] == "SYS.1005" and "no Enabled backup storage" in err["details"]
    assert [i["uuid"] for i in api.query("QueryImage")] == [env["image"]["uuid"]]
    # another account's volume is not found
    api.call("ChangeBackupStorageState", uuid=env["bs"]["uuid"], stateEvent="enable")
    eve = _account(api, node, "eve")
    assert eve.fails("CreateRootVolumeTemplateFromRootVolume", name="t",
                     rootVolumeUuid=root["uuid"])["code"] == "SYS.1006"


def test_a_failed_template_leaves_no_image_nor_file(node: Running, api: Api, tmp_path: Path) -> None:
    env = build_zone(api)
    vm = _stopped_vm(api, env)
    root, host = vm["allVolumes"][0], vm["lastHostUuid"]
    free = _bs_free(api, env["bs"]["uuid"])
    _fault(node, host, "/storage/local/export", error="disk on fire")
    err = api.fails("CreateRootVolumeTemplateFromRootVolume", name="t", rootVolumeUuid=root["uuid"],
                    resourceUuid="a" * 32)
    assert "disk on fire" in err["description"] + err["details"]
    _fault(node, host, "*", clear=True)
    # a second store that cannot fetch the copy (its agent finds no such file on the simulated
    # host): the first store's copy goes too
    sftp = api.call("AddSftpBackupStorage", name="sftp", hostname="127.0.0.1", username="root", password="x",
                    url=str(tmp_path / "bs"), systemTags=[f"agentPort::{node.agent_port}"])["inventory"]
    api.call("AttachBackupStorageToZone", backupStorageUuid=sftp["uuid"], zoneUuid=env["zone"]["uuid"])
    err = api.fails("CreateRootVolumeTemplateFromRootVolume", name="t", rootVolumeUuid=root["uuid"],
                    backupStorageUuids=[env["bs"]["uuid"], sftp["uuid"]])
    assert err["code"] == "HOST.1001"
    assert [i["uuid"] for i in api.query("QueryImage")] == [env["image"]["uuid"]]
    assert api.query("QueryUserTag") == [] and _bs_free(api, env["bs"]["uuid"]) == free
    assert not list((tmp_path / "bs").rglob("*.qcow2")) and not list((tmp_path / "bs").rglob("*.part"))
    # the resource uuid is free again, and the VM starts (its queue was let go)
    img = api.call("CreateRootVolumeTemplateFromRootVolume", name="t", rootVolumeUuid=root["uuid"],
                   resourceUuid="a" * 32)["inventory"]
    assert img["uuid"] == "a" * 32
    assert api.call("StartVmInstance", uuid=vm["uuid"])["inventory"]["state"] == "Running"


def test_data_volume_template_and_a_volume_from_it(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=2)
    vm = _vm(api, env)
    vol = api.call("CreateDataVolume", name="d", diskOfferingUuid=env["disk"]["uuid"])["inventory"]
    err = api.fails("CreateDataVolumeTemplateFromVolume", name="t", volumeUuid=vol["uuid"])
    assert err["code"] == "SYS.1005" and "NotInstantiated" in err["details"]
    api.call("AttachDataVolumeToVm", volumeUuid=vol["uuid"], vmInstanceUuid=vm["uuid"])
    err = api.fails("CreateDataVolumeTemplateFromVolume", name="t", volumeUuid=vol["uuid"])
    assert err["code"] == "SYS.1005" and "Stopped" in err["details"]
    api.call("DetachDataVolumeFromVm", uuid=vol["uuid"])
    api.call("ChangeVolumeState", uuid=vol["uuid"], stateEvent="disable")
    err = api.fails("CreateDataVolumeTemplateFromVolume", name="t", volumeUuid=vol["uuid"])
    assert err["code"] == "SYS.1005" and "Disabled" in err["details"]
    api.call("ChangeVolumeState", uuid=vol["uuid"], stateEvent="enable")
    tpl = api.call("CreateDataVolumeTemplateFromVolume", name="t", volumeUuid=vol["uuid"])["inventory"]
    assert tpl["mediaType"] == "DataVolumeTemplate" and tpl["status"] == "Ready" and tpl["format"] == "qcow2"
    assert tpl["size"] == 1 << 30 and tpl["url"] == f"volume://{vol['uuid']}"

    # a root template is not a data volume template
    ps = env["ps"]["uuid"]
    host = env["hosts"][1]["uuid"]
    err = api.fails("CreateDataVolumeFromVolumeTemplate", name="v", imageUuid=env["image"]["uuid"],
                    primaryStorageUuid=ps, hostUuid=host)
    assert err["code"] == "SYS.1007" and "DataVolumeTemplate" in err["details"]
    err = api.fails("CreateDataVolumeFromVolumeTemplate", name="v", imageUuid=tpl["uuid"], primaryStorageUuid=ps)
    assert err["code"] == "SYS.1007" and "hostUuid" in err["details"]  # local storage: which host's disks
    assert api.fails("CreateDataVolumeFromVolumeTemplate", name="v", imageUuid=tpl["uuid"],
                     primaryStorageUuid="2" * 32, hostUuid=host)["code"] == "SYS.1006"
    before = api.query("QueryPrimaryStorage", ("uuid", "=", ps))[0]["availableCapacity"]
    _fault(node, host, "/storage/local/create-root", error="no room")
    err = api.fails("CreateDataVolumeFromVolumeTemplate", name="v", imageUuid=tpl["uuid"], primaryStorageUuid=ps,
                    hostUuid=host)
    assert "no room" in err["description"] + err["details"]
    _fault(node, host, "*", clear=True)
    assert api.query("QueryVolume", ("name", "=", "v")) == []
    assert api.query("QueryPrimaryStorage", ("uuid", "=", ps))[0]["availableCapacity"] == before
    new = api.call("CreateDataVolumeFromVolumeTemplate", name="v", description="from t", imageUuid=tpl["uuid"],
                   primaryStorageUuid=ps, hostUuid=host)["inventory"]
    assert new["type"] == "Data" and new["status"] == "Ready" and new["size"] == tpl["size"]
    assert new["primaryStorageUuid"] == ps and new["rootImageUuid"] == tpl["uuid"] and "vmInstanceUuid" not in new
    assert api.query("QueryLocalStorageResourceRef", ("resourceUuid", "=", new["uuid"]))[0]["hostUuid"] == host
    assert api.query("QueryPrimaryStorage", ("uuid", "=", ps))[0]["availableCapacity"] == before - tpl["size"]
    # it attaches to a VM of that host only (its file is there)
    other = api.call("CreateVmInstance", name="b", imageUuid=env["image"]["uuid"], hostUuid=host,
                     instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]])["inventory"]
    att = api.call("AttachDataVolumeToVm", volumeUuid=new["uuid"], vmInstanceUuid=other["uuid"])["inventory"]
    assert att["vmInstanceUuid"] == other["uuid"] and att["installPath"] == new["installPath"]


def test_template_from_a_snapshot_and_the_snapshot_tree(node: Running, api: Api) -> None:
    env = build_zone(api)
    vm = _vm(api, env)
    root = vm["allVolumes"][0]
    s1 = api.call("CreateVolumeSnapshot", name="s1", volumeUuid=root["uuid"])["inventory"]
    s2 = api.call("CreateVolumeSnapshot", name="s2", volumeUuid=root["uuid"])["inventory"]
    # the snapshot's file is frozen: the VM runs on
    img = api.call("CreateRootVolumeTemplateFromVolumeSnapshot", name="from-s1", snapshotUuid=s1["uuid"],
                   guestOsType="tiny")["inventory"]
    assert img["status"] == "Ready" and img["mediaType"] == "RootVolumeTemplate" and img["guestOsType"] == "tiny"
    assert img["url"] == f"volumeSnapshot://{s1['uuid']}" and img["size"] == root["size"]
    assert api.fails("CreateRootVolumeTemplateFromVolumeSnapshot", name="x",
                     snapshotUuid="3" * 32)["code"] == "SYS.1006"

    (tree,) = api.call("GetVolumeSnapshotTree", volumeUuid=root["uuid"])["inventories"]
    assert tree["volumeUuid"] == root["uuid"] and tree["current"] is True and tree["uuid"] == s1["treeUuid"]
    top = tree["tree"]
    assert top["inventory"]["uuid"] == s1["uuid"] and "parentUuid" not in top
    (child,) = top["children"]
    assert child["inventory"]["uuid"] == s2["uuid"] and child["parentUuid"] == s1["uuid"] and child["children"] == []
    assert api.call("GetVolumeSnapshotTree", treeUuid=tree["uuid"])["inventories"][0]["uuid"] == tree["uuid"]
    assert api.fails("GetVolumeSnapshotTree")["code"] == "SYS.1007"
    eve = _account(api, node, "eve")
    assert eve.fails("GetVolumeSnapshotTree", volumeUuid=root["uuid"])["code"] == "SYS.1006"
    assert eve.fails("GetVolumeSnapshotTree", treeUuid=tree["uuid"])["code"] == "SYS.1006"


def test_sync_image_size(node: Running, api: Api) -> None:
    env = build_zone(api)
    out = api.call("SyncImageSize", uuid=env["image"]["uuid"])["inventory"]
    # a simulator store keeps no file: what it recorded stays
    assert out["uuid"] == env["image"]["uuid"] and out["size"] == env["image"]["size"]
    assert api.fails("SyncImageSize", uuid="4" * 32)["code"] == "SYS.1006"


def test_data_volume_from_a_snapshot(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=2)
    vm = _vm(api, env)
    root, host = vm["allVolumes"][0], vm["hostUuid"]
    snap = api.call("CreateVolumeSnapshot", name="s", volumeUuid=root["uuid"])["inventory"]
    ps = env["ps"]["uuid"]
    before = api.query("QueryPrimaryStorage", ("uuid", "=", ps))[0]["availableCapacity"]
    other_ps = api.call("AddLocalPrimaryStorage", name="ps2", url="/nimbo/ps2", zoneUuid=env["zone"]["uuid"])
    err = api.fails("CreateDataVolumeFromVolumeSnapshot", name="v", volumeSnapshotUuid=snap["uuid"],
                    primaryStorageUuid=other_ps["inventory"]["uuid"])
    assert err["code"] == "SYS.1005" and ps in err["details"]
    assert api.fails("CreateDataVolumeFromVolumeSnapshot", name="v",
                     volumeSnapshotUuid="5" * 32)["code"] == "SYS.1006"
    _fault(node, host, "/storage/local/export", error="broken disk")
    err = api.fails("CreateDataVolumeFromVolumeSnapshot", name="v", volumeSnapshotUuid=snap["uuid"])
    assert "broken disk" in err["description"] + err["details"]
    _fault(node, host, "*", clear=True)
    assert api.query("QueryVolume", ("name", "=", "v")) == []
    assert api.query("QueryPrimaryStorage", ("uuid", "=", ps))[0]["availableCapacity"] == before
    # the VM runs on: a snapshot's file never changes
    vol = api.call("CreateDataVolumeFromVolumeSnapshot", name="v", volumeSnapshotUuid=snap["uuid"],
                   primaryStorageUuid=ps)["inventory"]
    assert vol["type"] == "Data" and vol["status"] == "Ready" and vol["size"] == root["size"]
    assert vol["primaryStorageUuid"] == ps and "vmInstanceUuid" not in vol
    assert api.query("QueryLocalStorageResourceRef", ("resourceUuid", "=", vol["uuid"]))[0]["hostUuid"] == host
    assert api.query("QueryPrimaryStorage", ("uuid", "=", ps))[0]["availableCapacity"] == before - root["size"]
    att = api.call("AttachDataVolumeToVm", volumeUuid=vol["uuid"], vmInstanceUuid=vm["uuid"])["inventory"]
    assert att["vmInstanceUuid"] == vm["uuid"]
