"""Plugins as folders (nimbostack/plugins): what the loader registers it takes back, a provider is
found by what the L3 network has attached (never by name), and a VM is made by a service function
that needs no API request (what a virtual router appliance will call)."""

from __future__ import annotations

from typing import Any

from nimbostack.agent import plugins as agent_plugins
from nimbostack.agent.host import COMMANDS
from nimbostack.compute.vm import NewVm, create_vm_instance
from nimbostack.core import hooks
from nimbostack.core.auth import Caller
from nimbostack.core.context import ROUTES
from nimbostack.network import providers
from nimbostack.plugins import loader
from nimbostack.storage import backend
from tests.conftest import Api, Running, build_zone
from tests.integration.test_flat_network import public_l3


def test_the_built_in_plugins_are_the_folders_and_load_registers_what_they_declare(node: Running) -> None:
    assert loader.found() == ["flat", "local_storage", "security_group", "shared_mount_point"]
    assert set(loader.LOADED) == {"flat", "local_storage", "security_group", "shared_mount_point"}
    assert {"LocalStorage", "SharedMountPoint"} <= set(backend.BACKENDS)
    assert providers.PROVIDERS["Flat"].eip is not None
    assert {e.name for e in hooks.VM_START} >= {"Flat DHCP, userdata and EIP"}
    assert agent_plugins.found() == ["flat", "local_storage", "security_group", "shared_mount_point"]
    assert {"/flat/apply", "/sg/apply", "/storage/local/create-root", "/storage/smp/create-root"} <= set(COMMANDS)
    assert {"security group rules"} <= {e.name for e in hooks.VM_START}


def test_unload_takes_back_everything_and_load_puts_it_back(node: Running, api: Api) -> None:
    flat_hooks = len(hooks.VM_START), len(hooks.HOST_CONNECT), len(hooks.TAG_CHANGE)
    loader.unload("local_storage")
    loader.unload("flat")
    agent_plugins.unload("local_storage")
    try:
        assert "AddLocalPrimaryStorage" not in ROUTES and "LocalStorageMigrateVolume" not in ROUTES
        assert "LocalStorage" not in backend.BACKENDS and "Flat" not in providers.PROVIDERS
        assert not {e.name for e in hooks.VM_START} & {"Flat DHCP and userdata", "EIP"}
        assert len(hooks.HOST_CONNECT) == flat_hooks[1] - 2 and len(hooks.TAG_CHANGE) == flat_hooks[2] - 1
        assert not any(c.startswith("/storage/local/") for c in COMMANDS)
        assert "/storage/smp/create-root" in COMMANDS  # the other storage plugin stays
        zone = api.call("CreateZone", name="z")["inventory"]
        error = api.fails("AddLocalPrimaryStorage", name="ps", url="/tmp/ps", zoneUuid=zone["uuid"])
        assert "AddLocalPrimaryStorage" in error["details"]
    finally:
        agent_plugins.load("local_storage")
        loader.load("flat")
        loader.load("local_storage")
    assert (len(hooks.VM_START), len(hooks.HOST_CONNECT), len(hooks.TAG_CHANGE)) == flat_hooks
    assert "AddLocalPrimaryStorage" in ROUTES and "LocalStorage" in backend.BACKENDS
    assert "/storage/local/create-root" in COMMANDS
    zone = api.call("CreateZone", name="z2")["inventory"]
    api.call("AddLocalPrimaryStorage", name="ps", url="/tmp/ps", zoneUuid=zone["uuid"])


def _eip_setup(api: Api, env: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    pub = public_l3(api, env)
    vip = api.call("CreateVip", name="vip", l3NetworkUuid=pub["uuid"])["inventory"]
    vm = api.call(
        "CreateVmInstance",
        name="vm",
        imageUuid=env["image"]["uuid"],
        instanceOfferingUuid=env["offering"]["uuid"],
        l3NetworkUuids=[env["l3"]["uuid"]],
    )["inventory"]
    return vip, vm["vmNics"][0]


def test_an_eip_goes_to_the_provider_the_l3_has_attached_for_eip(node: Running, api: Api) -> None:
    env = build_zone(api)
    vip, nic = _eip_setup(api, env)
    vr = api.query("QueryNetworkServiceProvider", ("type", "=", "VirtualRouter"))[0]
    l2, l3, flat = env["l2"]["uuid"], env["l3"]["uuid"], env["flat"]["uuid"]
    api.call("AttachNetworkServiceProviderToL2Network", l2NetworkUuid=l2, networkServiceProviderUuid=vr["uuid"])
    # the L3's Eip is the virtual router's, whose plugin does not exist yet: refused, nothing made
    api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3, networkServices={vr["uuid"]: ["Eip"]})
    error = api.fails("CreateEip", name="e", vipUuid=vip["uuid"], vmNicUuid=nic["uuid"])
    assert error["code"] == "SYS.1005" and "VirtualRouter" in error["details"]
    assert api.query("QueryEip") == []
    # the same L3 with its Eip from Flat: the VIP records the provider the L3 has attached
    api.call("DetachNetworkServiceFromL3Network", l3NetworkUuid=l3, networkServices={vr["uuid"]: ["Eip"]})
    api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3, networkServices={flat: ["Eip"]})
    api.call("CreateEip", name="e", vipUuid=vip["uuid"], vmNicUuid=nic["uuid"])
    (v,) = api.query("QueryVip", ("uuid", "=", vip["uuid"]))
    assert v["serviceProvider"] == "Flat" and v["useFor"] == "Eip"


def test_a_vm_is_made_by_the_service_function_without_a_request(node: Running, api: Api) -> None:
    env = build_zone(api)
    p = node.platform
    admin = api.query("QueryAccount", ("name", "=", "admin"))[0]
    new = NewVm(
        caller=Caller(account_uuid=admin["uuid"], is_admin=True),
        name="appliance",
        instance_offering_uuid=env["offering"]["uuid"],
        image_uuid=env["image"]["uuid"],
        l3_network_uuids=[env["l3"]["uuid"]],
        type="ApplianceVm",
        system_tags=["hostname::appliance-1"],
    )
    made = node.run(create_vm_instance(p, new))
    assert made["state"] == "Running" and made["type"] == "ApplianceVm" and made["hostUuid"]
    assert [n["l3NetworkUuid"] for n in made["vmNics"]] == [env["l3"]["uuid"]]
    assert made["allVolumes"][0]["installPath"].endswith(f"/{made['rootVolumeUuid']}.qcow2")
    tags = api.query("QuerySystemTag", ("resourceUuid", "=", made["uuid"]))
    assert "hostname::appliance-1" in {t["tag"] for t in tags}
    # an appliance is not a user VM: QueryVmInstance does not list it
    assert api.query("QueryVmInstance", ("uuid", "=", made["uuid"])) == []
