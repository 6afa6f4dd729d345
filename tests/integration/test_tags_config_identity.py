"""System/user tags as the spec uses them, global config, accounts, sessions and bad input."""

from __future__ import annotations

import hashlib

from tests.conftest import Api, build_zone

USERDATA = "userdata::groups:\\n  - ubuntu: [foo,bar]\\n  - cloud-users\\nusers:\\n  - default"
KEY = "sshkey::ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC5x3AoWuiZawxXoBxEcOhhdVAST4kJA root@yyy"


def _vm(api: Api, env: dict, **extra: object) -> dict:
    return api.call("CreateVmInstance", name="vm", imageUuid=env["image"]["uuid"],
                    instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]],
                    **extra)["inventory"]


def test_userdata_and_sshkey_tags_as_in_the_spec(api: Api) -> None:
    env = build_zone(api)
    vm = _vm(api, env, systemTags=[USERDATA])
    (tag,) = api.query("QuerySystemTag", ("resourceUuid", "=", vm["uuid"]), ("tag", "~=", "userdata%"))
    assert tag["tag"] == USERDATA and tag["resourceType"] == "VmInstanceVO"
    key = api.call("CreateSystemTag", resourceUuid=vm["uuid"], resourceType="VmInstanceVO", tag=KEY)["inventory"]
    assert api.query("QuerySystemTag", ("resourceUuid", "=", vm["uuid"]), ("tag", "~=", "sshkey%"))[0]["uuid"] == \
        key["uuid"]
    updated = api.call("UpdateSystemTag", uuid=tag["uuid"], tag="userdata::#cloud-config\\nhostname: x")
    assert updated["inventory"]["tag"] == "userdata::#cloud-config\\nhostname: x"
    api.call("DeleteTag", uuid=key["uuid"])
    assert api.query("QuerySystemTag", ("resourceUuid", "=", vm["uuid"]), ("tag", "~=", "sshkey%")) == []


def test_bad_tags_are_refused(api: Api) -> None:
    env = build_zone(api)
    vm = _vm(api, env)
    err = api.fails("CreateSystemTag", resourceUuid=vm["uuid"], resourceType="VmInstanceVO", tag="nonsense::1")
    assert err["code"] == "SYS.1007" and "userdata::" in err["details"]
    err = api.fails("CreateSystemTag", resourceUuid=vm["uuid"], resourceType="VmInstanceVO",
                    tag="hostname::a;rm -rf /")
    assert err["code"] == "SYS.1007"
    err = api.fails("CreateSystemTag", resourceUuid="0" * 32, resourceType="VmInstanceVO", tag=USERDATA)
    assert err["code"] == "SYS.1006"
    err = api.fails("CreateVmInstance", name="v", imageUuid=env["image"]["uuid"],
                    instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]],
                    systemTags=["bogus"])
    assert err["code"] == "SYS.1007"
    assert len(api.query("QueryVmInstance")) == 1  # the refused create left nothing


def test_global_config_typed_and_validated(api: Api) -> None:
    (cfg,) = api.query("QueryGlobalConfig", ("category", "=", "vm"), ("name", "=", "deletionPolicy"))
    assert cfg["value"] == "Delay" and cfg["defaultValue"] == "Delay"
    for category, name, value in [("vm", "deletionPolicy", "Direct"), ("vm", "expungePeriod", "3600"),
                                  ("image", "expungeInterval", "60"), ("kvm", "vm.consoleMode", "spice"),
                                  ("kvm", "vm.cpuMode", "host-model"), ("kvm", "vm.cacheMode", "writeback"),
                                  ("volume", "deletionPolicy", "Never")]:
        out = api.call("UpdateGlobalConfig", category=category, name=name, value=value)["inventory"]
        assert out["value"] == value
    for category, name, value in [("vm", "deletionPolicy", "Sometimes"), ("vm", "expungePeriod", "soon"),
                                  ("vm", "expungePeriod", "0"), ("kvm", "vm.consoleMode", "rdp"),
                                  ("kvm", "nosuch", "1")]:
        err = api.fails("UpdateGlobalConfig", category=category, name=name, value=value)
        assert err["code"] == "SYS.1007", (name, value)
    assert api.call("GetGlobalConfig", category="kvm", name="vm.consoleMode")["inventory"]["value"] == "spice"


def test_sessions_and_accounts_isolate_resources(api: Api, node) -> None:  # noqa: ANN001
    env = build_zone(api)
    admin_vm = _vm(api, env)
    digest = hashlib.sha512(b"pw1").hexdigest()
    api.call("CreateAccount", name="alice", password=digest)
    alice = Api(node.url)
    err = alice.fails("QueryVmInstance", conditions=[])
    assert err["code"] == "ID.1001"
    assert alice.raw("LogInByAccount", {"accountName": "alice", "password": "0" * 128})["error"]["code"] == "ID.1004"
    alice.login("alice", "pw1")
    mine = _vm(alice, env)
    assert [v["uuid"] for v in alice.query("QueryVmInstance")] == [mine["uuid"]]
    assert {v["uuid"] for v in api.query("QueryVmInstance")} == {admin_vm["uuid"], mine["uuid"]}
    err = alice.fails("StopVmInstance", uuid=admin_vm["uuid"])
    assert err["code"] == "SYS.1006"  # another account's uuid looks like no uuid at all
    assert alice.fails("CreateZone", name="z")["code"] == "ID.1003"
    assert alice.fails("QueryHost", conditions=[])["code"] == "ID.1003"
    alice.call("LogOut")
    assert alice.fails("QueryVmInstance", conditions=[])["code"] == "ID.1001"


def test_bad_input_never_500(api: Api, node) -> None:  # noqa: ANN001
    import json

    import httpx

    url = f"{node.url}/zstack/api"
    sid = api.session
    cases = [
        b"not json",
        b'{"a": 1, "b": 2}',
        b'{"org.zstack.header.vm.APINoSuchMsg": {}}',
        json.dumps({"org.zstack.header.zone.APICreateZoneMsg": {"session": {"uuid": sid}}}).encode(),
        json.dumps({"org.zstack.header.zone.APICreateZoneMsg": {"name": "z", "bogus": 1, "session": {"uuid": sid}}})
        .encode(),
        b'{"org.zstack.header.zone.APICreateZoneMsg": "x"}',
    ]
    for raw in cases:
        r = httpx.post(url, content=raw)
        assert r.status_code == 200, raw
        body = r.json()
        assert body["state"] == "Done"
        (reply,) = json.loads(body["result"]).values()
        assert reply["success"] is False and reply["error"]["code"] and reply["error"]["details"], raw
    # agents' events are not taken on the API's port (tests/integration/test_agent_wire.py)
    assert httpx.post(f"{node.url}/agent/events", content=b"{}").status_code == 404
    err = api.fails("CreateInstanceOffering", name="o", cpuNum="two", cpuSpeed=1, memorySize=1 << 30, **{})
    assert "cpuNum must be an integer" in err["details"]
    doc = httpx.get(f"{node.url}/openapi.json").json()
    assert "CreateVmInstance" in doc["components"]["schemas"]
