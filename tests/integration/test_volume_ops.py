"""Data volume operations (simulator): which volumes and VMs go together (GetVmAttachableDataVolume,
GetDataVolumeAttachableVm), ChangeVolumeState, GetVolumeFormat, GetVolumeCapabilities, SyncVolumeSize."""

from __future__ import annotations

from typing import Any

from tests.conftest import Api, Running, build_zone
from tests.integration.test_vm_nics import _account, _vm


def _volume(client: Api, env: dict[str, Any], name: str = "d") -> dict[str, Any]:
    return client.call("CreateDataVolume", name=name, diskOfferingUuid=env["disk"]["uuid"])["inventory"]


def _uuids(reply: dict[str, Any]) -> set[str]:
    return {i["uuid"] for i in reply["inventories"]}


def test_attachable_volumes_and_vms_follow_what_attach_accepts(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=2)
    vm1, vm2 = _vm(api, env, "a"), _vm(api, env, "b")
    if vm1["hostUuid"] == vm2["hostUuid"]:  # the second on the other host, to test local storage
        api.call("StopVmInstance", uuid=vm2["uuid"])
        api.call("DestroyVmInstance", uuid=vm2["uuid"])
        other = next(h["uuid"] for h in env["hosts"] if h["uuid"] != vm1["hostUuid"])
        vm2 = api.call("CreateVmInstance", name="b", imageUuid=env["image"]["uuid"], hostUuid=other,
                       instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]])["inventory"]
    fresh, used = _volume(api, env, "fresh"), _volume(api, env, "used")
    # not made yet: attachable anywhere
    assert _uuids(api.call("GetVmAttachableDataVolume", vmInstanceUuid=vm1["uuid"])) == {fresh["uuid"], used["uuid"]}
    assert _uuids(api.call("GetDataVolumeAttachableVm", volumeUuid=fresh["uuid"])) == {vm1["uuid"], vm2["uuid"]}
    # made on vm1's host's local storage, then detached: only VMs of that host take it
    api.call("AttachDataVolumeToVm", volumeUuid=used["uuid"], vmInstanceUuid=vm1["uuid"])
    assert _uuids(api.call("GetVmAttachableDataVolume", vmInstanceUuid=vm1["uuid"])) == {fresh["uuid"]}
    assert _uuids(api.call("GetDataVolumeAttachableVm", volumeUuid=used["uuid"])) == set()
    api.call("DetachDataVolumeFromVm", uuid=used["uuid"])
    assert _uuids(api.call("GetDataVolumeAttachableVm", volumeUuid=used["uuid"])) == {vm1["uuid"]}
    assert used["uuid"] not in _uuids(api.call("GetVmAttachableDataVolume", vmInstanceUuid=vm2["uuid"]))
    err = api.fails("AttachDataVolumeToVm", volumeUuid=used["uuid"], vmInstanceUuid=vm2["uuid"])
    assert err["code"] == "SYS.1005"
    # a disabled volume is neither offered nor attached
    out = api.call("ChangeVolumeState", uuid=fresh["uuid"], stateEvent="disable")["inventory"]
    assert out["state"] == "Disabled"
    assert fresh["uuid"] not in _uuids(api.call("GetVmAttachableDataVolume", vmInstanceUuid=vm1["uuid"]))
    assert _uuids(api.call("GetDataVolumeAttachableVm", volumeUuid=fresh["uuid"])) == set()
    assert api.fails("AttachDataVolumeToVm", volumeUuid=fresh["uuid"], vmInstanceUuid=vm1["uuid"])["code"] == "SYS.1005"
    assert api.fails("ChangeVolumeState", uuid=fresh["uuid"], stateEvent="pause")["code"] == "SYS.1007"
    api.call("ChangeVolumeState", uuid=fresh["uuid"], stateEvent="enable")
    api.call("AttachDataVolumeToVm", volumeUuid=fresh["uuid"], vmInstanceUuid=vm1["uuid"])


def test_another_accounts_volumes_and_vms_are_not_offered(node: Running, api: Api) -> None:
    env = build_zone(api)
    alice, bob = _account(api, node, "alice"), _account(api, node, "bob")
    avm, bvm = _vm(alice, env, "a"), _vm(bob, env, "b")
    avol, bvol = _volume(alice, env, "a"), _volume(bob, env, "b")
    assert _uuids(alice.call("GetVmAttachableDataVolume", vmInstanceUuid=avm["uuid"])) == {avol["uuid"]}
    assert _uuids(alice.call("GetDataVolumeAttachableVm", volumeUuid=avol["uuid"])) == {avm["uuid"]}
    assert alice.fails("GetDataVolumeAttachableVm", volumeUuid=bvol["uuid"])["code"] == "SYS.1006"
    assert alice.fails("GetVmAttachableDataVolume", vmInstanceUuid=bvm["uuid"])["code"] == "SYS.1006"
    assert alice.fails("ChangeVolumeState", uuid=bvol["uuid"], stateEvent="disable")["code"] == "SYS.1006"
    # the admin is offered every account's
    assert {avol["uuid"], bvol["uuid"]} <= _uuids(api.call("GetVmAttachableDataVolume", vmInstanceUuid=avm["uuid"]))


def test_formats_capabilities_and_size_sync(node: Running, api: Api) -> None:
    env = build_zone(api)
    formats = api.call("GetVolumeFormat")["formats"]
    assert [f["format"] for f in formats] == ["qcow2", "raw"]
    vm = _vm(api, env)
    root = vm["allVolumes"][0]
    caps = api.call("GetVolumeCapabilities", uuid=root["uuid"])["capabilities"]
    assert caps == {"MigrationInCurrentPrimaryStorage": True, "MigrationToOtherPrimaryStorage": False}
    out = api.call("SyncVolumeSize", uuid=root["uuid"])["inventory"]
    assert out["actualSize"] == 0 and out["size"] == root["size"]  # the simulator's files are empty
    vol = _volume(api, env)
    err = api.fails("SyncVolumeSize", uuid=vol["uuid"])
    assert err["code"] == "SYS.1005" and "NotInstantiated" in err["details"]
