"""The configuration APIs of offerings (issue 13 item 12): Change/Update Instance/Disk Offering,
and what a Disabled offering refuses."""

from __future__ import annotations

import hashlib
from typing import Any

from tests.conftest import Api, Running, build_zone


def _account(api: Api, node: Running, name: str) -> Api:
    api.call("CreateAccount", name=name, password=hashlib.sha512(name.encode()).hexdigest())
    client = Api(node.url)
    client.login(name, name)
    return client


def _vm(api: Api, env: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return api.call("CreateVmInstance", name="vm", imageUuid=env["image"]["uuid"],
                    instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]],
                    **extra)["inventory"]


def test_offering_states_decide_what_new_vms_and_volumes_may_use(node: Running, api: Api) -> None:
    env = build_zone(api)
    io, do = env["offering"]["uuid"], env["disk"]["uuid"]
    vm = _vm(api, env)

    out = api.call("ChangeInstanceOfferingState", uuid=io, stateEvent="disable")["inventory"]
    assert out["uuid"] == io and out["state"] == "Disabled"
    assert api.query("QueryInstanceOffering", ("uuid", "=", io))[0]["state"] == "Disabled"
    err = api.fails("CreateVmInstance", name="no", imageUuid=env["image"]["uuid"], instanceOfferingUuid=io,
                    l3NetworkUuids=[env["l3"]["uuid"]])
    assert err["code"] == "SYS.1005" and "Disabled" in err["details"]
    api.call("RebootVmInstance", uuid=vm["uuid"])  # the VMs made from it keep working
    api.call("ChangeInstanceOfferingState", uuid=io, stateEvent="enable")

    assert api.call("ChangeDiskOfferingState", uuid=do, stateEvent="disable")["inventory"]["state"] == "Disabled"
    assert api.fails("CreateDataVolume", name="no", diskOfferingUuid=do)["code"] == "SYS.1005"
    assert api.fails("CreateVmInstance", name="no", imageUuid=env["image"]["uuid"], instanceOfferingUuid=io,
                     l3NetworkUuids=[env["l3"]["uuid"]], dataDiskOfferingUuids=[do])["code"] == "SYS.1005"
    api.call("ChangeDiskOfferingState", uuid=do, stateEvent="enable")
    assert api.call("CreateDataVolume", name="yes", diskOfferingUuid=do)["inventory"]["diskOfferingUuid"] == do
    _vm(api, env, dataDiskOfferingUuids=[do])

    assert api.fails("ChangeDiskOfferingState", uuid=do, stateEvent="maintain")["code"] == "SYS.1007"
    assert api.fails("ChangeInstanceOfferingState", uuid=do, stateEvent="enable")["code"] == "SYS.1006"
    assert api.fails("ChangeDiskOfferingState", uuid=io, stateEvent="enable")["code"] == "SYS.1006"
    tenant = _account(api, node, "offering-tenant")
    assert tenant.fails("ChangeInstanceOfferingState", uuid=io, stateEvent="disable")["code"] == "ID.1003"


def test_update_offerings_changes_name_and_description_only(node: Running, api: Api) -> None:
    env = build_zone(api)
    io, do = env["offering"], env["disk"]
    out = api.call("UpdateInstanceOffering", uuid=io["uuid"], name="tiny", description="one small CPU")["inventory"]
    assert (out["name"], out["description"]) == ("tiny", "one small CPU")
    assert {k: out[k] for k in ("cpuNum", "cpuSpeed", "memorySize")} == {
        k: io[k] for k in ("cpuNum", "cpuSpeed", "memorySize")}
    assert api.query("QueryInstanceOffering", ("name", "=", "tiny"))[0]["uuid"] == io["uuid"]
    out = api.call("UpdateDiskOffering", uuid=do["uuid"], description="a GiB")["inventory"]
    assert (out["name"], out["description"], out["diskSize"]) == (do["name"], "a GiB", do["diskSize"])
    out = api.call("UpdateDiskOffering", uuid=do["uuid"], name="d2")["inventory"]
    assert (out["name"], out["description"]) == ("d2", "a GiB")  # what is not given stays

    assert api.fails("UpdateInstanceOffering", uuid=io["uuid"], name="  ")["code"] == "SYS.1007"
    assert api.fails("UpdateDiskOffering", uuid=do["uuid"], diskSize=5)["code"] == "SYS.1007"  # no such field
    assert api.fails("UpdateDiskOffering", uuid="0" * 32, name="x")["code"] == "SYS.1006"
    tenant = _account(api, node, "update-tenant")
    assert tenant.fails("UpdateDiskOffering", uuid=do["uuid"], name="mine")["code"] == "ID.1003"
