"""A VM's make-up after its creation (simulator): ChangeInstanceOffering, UpdateVmInstance (state,
default network), GetVmStartingCandidateClustersHosts, GetVmCapabilities, host names."""

from __future__ import annotations

import time
from typing import Any

from tests.conftest import Api, Running, build_zone
from tests.integration.test_flat_network import entry_of
from tests.integration.test_vm_nics import _account, _second_l3, _vm


def _host(api: Api, uuid: str) -> dict[str, Any]:
    return api.query("QueryHost", ("uuid", "=", uuid))[0]


def test_change_instance_offering_of_a_stopped_vm(node: Running, api: Api) -> None:
    env = build_zone(api)
    vm = _vm(api, env)
    big = api.call("CreateInstanceOffering", name="big", cpuNum=2, cpuSpeed=200, memorySize=512 << 20)["inventory"]
    err = api.fails("ChangeInstanceOffering", vmInstanceUuid=vm["uuid"], instanceOfferingUuid=big["uuid"])
    assert err["code"] == "SYS.1005" and "Running" in err["details"] and "stop it" in err["details"]
    api.call("StopVmInstance", uuid=vm["uuid"])
    out = api.call("ChangeInstanceOffering", vmInstanceUuid=vm["uuid"], instanceOfferingUuid=big["uuid"])["inventory"]
    assert (out["cpuNum"], out["cpuSpeed"], out["memorySize"]) == (2, 200, 512 << 20)
    assert out["instanceOfferingUuid"] == big["uuid"] and out["state"] == "Stopped"
    # the next start takes the new size from the host
    host = vm["hostUuid"]
    before = _host(api, host)
    api.call("StartVmInstance", uuid=vm["uuid"])
    after = _host(api, host)
    assert before["availableMemoryCapacity"] - after["availableMemoryCapacity"] == 512 << 20
    assert before["availableCpuCapacity"] - after["availableCpuCapacity"] == 400
    # a disabled offering, and one that does not exist
    api.call("StopVmInstance", uuid=vm["uuid"])
    api.call("ChangeInstanceOfferingState", uuid=env["offering"]["uuid"], stateEvent="disable")
    err = api.fails("ChangeInstanceOffering", vmInstanceUuid=vm["uuid"], instanceOfferingUuid=env["offering"]["uuid"])
    assert err["code"] == "SYS.1005"
    err = api.fails("ChangeInstanceOffering", vmInstanceUuid=vm["uuid"], instanceOfferingUuid="0" * 32)
    assert err["code"] == "SYS.1006"


def test_update_vm_instance_fields_state_and_default_network(node: Running, api: Api) -> None:
    env = build_zone(api)
    l3b = _second_l3(api, env)
    vm = _vm(api, env)
    out = api.call("UpdateVmInstance", uuid=vm["uuid"], name="renamed", description="d", platform="Windows")
    assert (out["inventory"]["name"], out["inventory"]["description"], out["inventory"]["platform"]) == (
        "renamed", "d", "Windows")
    assert api.fails("UpdateVmInstance", uuid=vm["uuid"], platform="BeOS")["code"] == "SYS.1007"
    assert api.fails("UpdateVmInstance", uuid=vm["uuid"], state="Paused")["code"] == "SYS.1007"
    # a running VM's state is Start/StopVmInstance's to change
    err = api.fails("UpdateVmInstance", uuid=vm["uuid"], state="Stopped")
    assert err["code"] == "SYS.1005" and "Unknown" in err["details"]
    # the default network moves, and its lease carries the default route from then on
    vm = api.call("AttachL3NetworkToVm", vmInstanceUuid=vm["uuid"], l3NetworkUuid=l3b["uuid"])["inventory"]
    assert entry_of(node, vm, l3b["uuid"])["isDefault"] is False  # type: ignore[index]
    vm = api.call("UpdateVmInstance", uuid=vm["uuid"], defaultL3NetworkUuid=l3b["uuid"])["inventory"]
    assert vm["defaultL3NetworkUuid"] == l3b["uuid"]
    assert entry_of(node, vm, l3b["uuid"])["isDefault"] is True  # type: ignore[index]
    assert entry_of(node, vm, env["l3"]["uuid"])["isDefault"] is False  # type: ignore[index]
    # an admin repairs a VM its host lost track of
    host = vm["hostUuid"]
    _set_unknown(node, api, vm["uuid"])
    before = _host(api, host)["availableMemoryCapacity"]
    out = api.call("UpdateVmInstance", uuid=vm["uuid"], state="Stopped")["inventory"]
    assert out["state"] == "Stopped" and "hostUuid" not in out and out["lastHostUuid"] == host
    assert _host(api, host)["availableMemoryCapacity"] - before == vm["memorySize"]
    assert entry_of(node, out, env["l3"]["uuid"]) is None
    api.call("StartVmInstance", uuid=vm["uuid"])


def _set_unknown(node: Running, api: Api, vm_uuid: str) -> None:
    """The VM as a host that lost track of it leaves it. The agent's event of the VM's start may
    still be on its way and would set it Running again: set it until it stays."""
    from sqlalchemy import update

    from nimbostack.db import models as m

    async def unknown() -> None:
        async with node.platform.db.tx() as s:
            await s.execute(update(m.VmInstance).where(m.VmInstance.uuid == vm_uuid).values(state="Unknown"))

    for _ in range(20):
        node.run(unknown())
        time.sleep(0.3)
        if api.query("QueryVmInstance", ("uuid", "=", vm_uuid))[0]["state"] == "Unknown":
            return
    raise AssertionError(f"VM {vm_uuid} does not stay Unknown")


def test_a_normal_account_cannot_set_a_vm_state(node: Running, api: Api) -> None:
    env = build_zone(api)
    alice = _account(api, node, "alice")
    vm = _vm(alice, env)
    _set_unknown(node, api, vm["uuid"])
    err = alice.fails("UpdateVmInstance", uuid=vm["uuid"], state="Running")
    assert err["code"] == "SYS.1005" and "admin" in err["details"]
    assert api.call("UpdateVmInstance", uuid=vm["uuid"], state="Running")["inventory"]["state"] == "Running"


def test_starting_candidates_and_capabilities(node: Running, api: Api) -> None:
    env = build_zone(api, hosts=3)
    vm = _vm(api, env)
    err = api.fails("GetVmStartingCandidateClustersHosts", uuid=vm["uuid"])
    assert err["code"] == "SYS.1005"
    caps = api.call("GetVmCapabilities", uuid=vm["uuid"])["capabilities"]
    # its root volume is on local storage: it moves with LocalStorageMigrateVolume, not live
    assert caps == {"LiveMigration": False, "VolumeMigration": True}
    api.call("StopVmInstance", uuid=vm["uuid"])
    out = api.call("GetVmStartingCandidateClustersHosts", uuid=vm["uuid"])
    # the volume lives on one host's local storage: that host alone
    assert [h["uuid"] for h in out["hostInventories"]] == [vm["hostUuid"]]
    assert [c["uuid"] for c in out["clusterInventories"]] == [env["cluster"]["uuid"]]
    api.call("ChangeHostState", uuid=vm["hostUuid"], stateEvent="disable")
    out = api.call("GetVmStartingCandidateClustersHosts", uuid=vm["uuid"])
    assert out["hostInventories"] == [] and out["clusterInventories"] == []


def test_hostname_set_get_delete_follows_into_the_lease(node: Running, api: Api) -> None:
    env = build_zone(api)
    l3 = env["l3"]["uuid"]
    vm, other = _vm(api, env), _vm(api, env, "other")
    assert api.call("GetVmHostname", uuid=vm["uuid"]).get("hostname") is None
    api.call("SetVmHostname", uuid=vm["uuid"], hostname="web-1")
    assert api.call("GetVmHostname", uuid=vm["uuid"])["hostname"] == "web-1"
    assert entry_of(node, vm, l3)["hostname"] == "web-1"  # type: ignore[index]
    api.call("SetVmHostname", uuid=vm["uuid"], hostname="web-2")  # replaces, does not add
    tags = [t["tag"] for t in api.query("QuerySystemTag", ("resourceUuid", "=", vm["uuid"]))]
    assert [t for t in tags if t.startswith("hostname::")] == ["hostname::web-2"]
    err = api.fails("SetVmHostname", uuid=other["uuid"], hostname="web-2")
    assert err["code"] == "SYS.1005" and vm["uuid"] in err["details"]
    assert api.fails("SetVmHostname", uuid=vm["uuid"], hostname="not a name;")["code"] == "SYS.1007"
    api.call("DeleteVmHostname", uuid=vm["uuid"])
    assert api.call("GetVmHostname", uuid=vm["uuid"]).get("hostname") is None
    assert entry_of(node, vm, l3)["hostname"] == "vm"  # type: ignore[index]
