"""The >>> shell against a real management node, running the spec's own commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nimbostack.cli import main as cli
from tests.conftest import Api, build_zone


@pytest.fixture
def shell(node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):  # noqa: ANN001, ANN201
    monkeypatch.setenv("NIMBOSTACK_CLI_HOME", str(tmp_path / "cli"))

    def run(*words: str) -> tuple[int, dict]:
        capsys.readouterr()
        code = cli(["--port", str(node.port), *words])
        out = capsys.readouterr().out
        return code, (json.loads(out) if out.strip().startswith("{") else {"raw": out})

    assert run("LogInByAccount", "accountName=admin", "password=password")[0] == 0
    return run


def test_cli_exit_codes_and_session_kept(shell) -> None:  # noqa: ANN001
    code, out = shell("CreateZone", "name=z1", "description=first zone")
    assert code == 0 and out["inventory"]["name"] == "z1" and out["success"] is True
    code, out = shell("QueryZone", "name=z1", "fields=uuid,name,")
    assert code == 0 and sorted(out["inventories"][0]) == ["name", "uuid"]
    code, out = shell("StartVmInstance", "uuid=" + "0" * 32)
    assert code == 1 and out["error"]["code"] == "SYS.1006"
    assert shell("NoSuchCommand")[0] == 2
    assert shell("CreateZone")[0] == 2  # missing mandatory name


def test_upgrade_walkthrough_from_the_release_notes(shell, node) -> None:  # noqa: ANN001
    api = Api(node.url)
    api.login()
    env = build_zone(api)
    l3, l2 = env["l3"]["uuid"], env["l2"]["uuid"]
    vr = api.query("QueryNetworkServiceProvider", ("type", "=", "VirtualRouter"))[0]["uuid"]
    flat = env["flat"]["uuid"]
    # start from an L3 whose DHCP/DNS come from the virtual router provider
    services = json.dumps({flat: ["DHCP", "Userdata"]})
    shell("DetachNetworkServiceFromL3Network", f"l3NetworkUuid={l3}", f"networkServices={services}")
    shell("AttachNetworkServiceProviderToL2Network", f"l2NetworkUuid={l2}", f"networkServiceProviderUuid={vr}")
    code, _ = shell("AttachNetworkServiceToL3Network", f"l3NetworkUuid={l3}",
                    f"networkServices={json.dumps({vr: ['DHCP', 'DNS']})}")
    assert code == 0

    code, out = shell("QueryNetworkServiceL3NetworkRef", f"l3NetworkUuid={l3}")
    assert code == 0 and {r["networkServiceType"] for r in out["inventories"]} == {"DHCP", "DNS"}
    assert {r["networkServiceProviderUuid"] for r in out["inventories"]} == {vr}
    code, out = shell("DetachNetworkServiceFromL3Network", f"l3NetworkUuid={l3}",
                      f"networkServices={{\"{vr}\":[\"DHCP\",\"DNS\"]}}")
    assert code == 0 and out["inventory"]["networkServices"] == [] and out["inventory"]["dns"] == ["198.18.0.1"]
    assert out["inventory"]["ipRanges"][0]["netmask"] == "255.255.252.0"
    code, out = shell("QueryNetworkServiceProvider", "type=Flat")
    inv = out["inventories"][0]
    assert inv["name"] == "Flat Network Service Provider" and {"DHCP", "Userdata"} <= set(inv["networkServiceTypes"])
    assert l2 in inv["attachedL2NetworkUuids"]
    code, out = shell("QueryL3Network", "fields=l2NetworkUuid,", f"uuid={l3}")
    assert out["inventories"] == [{"l2NetworkUuid": l2}]
    code, out = shell("AttachNetworkServiceProviderToL2Network", f"l2NetworkUuid={l2}",
                      f"networkServiceProviderUuid={flat}")
    assert code == 0 and out["inventory"]["type"] == "Flat"
    code, out = shell("AttachNetworkServiceToL3Network", f"l3NetworkUuid={l3}",
                      f"networkServices={{\"{flat}\":[\"DHCP\",\"Userdata\"]}}")
    assert code == 0
    assert [(s["networkServiceProviderUuid"], s["networkServiceType"]) for s in out["inventory"]["networkServices"]] \
        == [(flat, "DHCP"), (flat, "Userdata")]
    code, out = shell("QueryVirtualRouterVm")
    assert code == 0 and out["inventories"] == []
    code, out = shell("QueryHost")
    assert code == 0 and out["inventories"][0]["status"] == "Connected"
    code, out = shell("ReconnectHost", f"uuid={out['inventories'][0]['uuid']}")
    assert code == 0 and out["success"] is True


def test_spec_vm_commands_through_the_shell(shell, node) -> None:  # noqa: ANN001
    api = Api(node.url)
    api.login()
    env = build_zone(api)
    code, out = shell("CreateVmInstance", "name=vm", f"imageUuid={env['image']['uuid']}",
                      f"instanceOfferingUuid={env['offering']['uuid']}", f"l3NetworkUuids={env['l3']['uuid']}",
                      f"defaultL3NetworkUuid={env['l3']['uuid']}",
                      "systemTags=userdata::groups:\\n  - ubuntu: [foo,bar]\\n  - cloud-users")
    assert code == 0, out
    vm = out["inventory"]["uuid"]
    code, out = shell("QuerySystemTag", f"resourceUuid={vm}", "tag~=userdata%")
    assert out["inventories"][0]["tag"] == "userdata::groups:\\n  - ubuntu: [foo,bar]\\n  - cloud-users"
    code, out = shell("UpdateGlobalConfig", "category=vm", "name=deletionPolicy", "value=Direct")
    assert code == 0 and out["inventory"]["value"] == "Direct"
    code, out = shell("GetVmBootOrder", f"uuid={vm}")
    assert out["orders"] == ["HardDisk"]
    code, out = shell("SetVmBootOrder", f"uuid={vm}", "bootOrder=HardDisk,CdRom")
    assert code == 0
    assert shell("GetVmBootOrder", f"uuid={vm}")[1]["orders"] == ["HardDisk", "CdRom"]
    code, out = shell("GetVmConsoleAddress", f"uuid={vm}")
    assert code == 0 and set(out) >= {"hostIp", "port", "protocol", "success"} and out["protocol"] == "vnc"
    assert shell("DestroyVmInstance", f"uuid={vm}")[0] == 0
    assert api.query("QueryVmInstance") == []  # Direct: gone at once
