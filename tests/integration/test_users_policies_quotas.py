"""ZStack 1.2's identity family (issue 13 item 9): users and user groups of an account, policies
enforced on every call of a user's session (nothing unless allowed, Deny wins), quotas enforced at
creation, resources shared across accounts, and the login throttle for LogInByUser."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import httpx

from tests.conftest import Api, Running, build_zone

WRONG = "0" * 128


def _digest(pw: str) -> str:
    return hashlib.sha512(pw.encode()).hexdigest()


def _account(api: Api, node: Running, name: str) -> tuple[Api, dict[str, Any]]:
    inv = api.call("CreateAccount", name=name, password=_digest(name))["inventory"]
    client = Api(node.url)
    client.login(name, name)
    return client, inv


def _user(node: Running, account: str, name: str, password: str | None = None) -> Api:
    client = Api(node.url)
    reply = client.call("LogInByUser", accountName=account, userName=name, password=_digest(password or name))
    client.session = reply["inventory"]["uuid"]
    return client


def _policy(owner: Api, name: str, *statements: tuple[str, list[str]]) -> dict[str, Any]:
    body = [{"effect": effect, "actions": actions} for effect, actions in statements]
    return owner.call("CreatePolicy", name=name, statements=body)["inventory"]


def test_users_log_in_act_for_their_account_and_never_show_a_password(node: Running, api: Api) -> None:
    acme, acme_inv = _account(api, node, "acme")
    user = acme.call("CreateUser", name="dave", password=_digest("dave"), description="ops")["inventory"]
    assert user["accountUuid"] == acme_inv["uuid"] and user["name"] == "dave"
    assert not any("password" in k.lower() for k in user)
    # a second user of the same name in the same account is refused; another account may have one
    assert acme.fails("CreateUser", name="dave", password=_digest("x"))["code"] == "SYS.1007"
    other, other_inv = _account(api, node, "other")
    other.call("CreateUser", name="dave", password=_digest("other-dave"))
    # log in by account name or by account uuid
    session = Api(node.url).call("LogInByUser", accountName="acme", userName="dave", password=_digest("dave"))
    assert session["inventory"]["userUuid"] == user["uuid"]
    assert session["inventory"]["accountUuid"] == acme_inv["uuid"]
    by_uuid = Api(node.url).call("LogInByUser", accountUuid=acme_inv["uuid"], userName="dave", password=_digest("dave"))
    assert by_uuid["inventory"]["userUuid"] == user["uuid"]
    other_password = {"accountName": "acme", "userName": "dave", "password": _digest("other-dave")}
    err = Api(node.url).raw("LogInByUser", other_password)
    assert err["error"]["code"] == "ID.1004"
    assert Api(node.url).raw("LogInByUser", {"userName": "dave", "password": WRONG})["error"]["code"] == "SYS.1007"
    # queries: the account sees its users, another account does not; nested by account
    (found,) = acme.query("QueryUser", ("name", "=", "dave"))
    assert found == user
    assert [u["name"] for u in api.query("QueryUser", ("account.name", "=", "other"))] == ["dave"]
    assert acme.query("QueryUser", ("accountUuid", "=", other_inv["uuid"])) == []
    # the user changes its own password without any policy; the old one stops working
    dave = _user(node, "acme", "dave")
    dave.call("UpdateUser", password=_digest("new"))
    assert Api(node.url).raw(
        "LogInByUser", {"accountName": "acme", "userName": "dave", "password": _digest("dave")}
    )["error"]["code"] == "ID.1004"
    _user(node, "acme", "dave", "new")
    updated = acme.call("UpdateUser", uuid=user["uuid"], name="david", description="lead")["inventory"]
    assert (updated["name"], updated["description"]) == ("david", "lead")
    # another account's user is no user at all to acme
    (others,) = other.query("QueryUser")
    assert acme.fails("UpdateUser", uuid=others["uuid"], name="mine")["code"] == "SYS.1006"
    assert acme.fails("DeleteUser", uuid=others["uuid"])["code"] == "SYS.1006"
    # deleting the user ends its sessions
    assert dave.call("ValidateSession", sessionUuid=dave.session)["validSession"] is True
    acme.call("DeleteUser", uuid=user["uuid"])
    assert acme.query("QueryUser") == []
    assert dave.call("ValidateSession", sessionUuid=dave.session)["validSession"] is False


def test_user_groups_and_their_members(node: Running, api: Api) -> None:
    acme, _ = _account(api, node, "acme")
    u1 = acme.call("CreateUser", name="u1", password=_digest("u1"))["inventory"]
    group = acme.call("CreateUserGroup", name="infra", description="builders")["inventory"]
    assert group["name"] == "infra" and group["description"] == "builders"
    acme.call("AddUserToGroup", userUuid=u1["uuid"], groupUuid=group["uuid"])
    acme.call("AddUserToGroup", userUuid=u1["uuid"], groupUuid=group["uuid"])  # twice is no error
    renamed = acme.call("UpdateUserGroup", uuid=group["uuid"], name="platform")["inventory"]
    assert renamed["name"] == "platform"
    assert [g["name"] for g in acme.query("QueryUserGroup")] == ["platform"]
    other, _ = _account(api, node, "other")
    assert other.query("QueryUserGroup") == []
    assert other.fails("DeleteUserGroup", uuid=group["uuid"])["code"] == "SYS.1006"
    theirs = other.call("CreateUser", name="x", password=_digest("x"))["inventory"]
    # a group takes only users of its own account (the admin could name both)
    assert api.fails("AddUserToGroup", userUuid=theirs["uuid"], groupUuid=group["uuid"])["code"] == "SYS.1007"
    acme.call("RemoveUserFromGroup", userUuid=u1["uuid"], groupUuid=group["uuid"])
    acme.call("DeleteUserGroup", uuid=group["uuid"])
    assert acme.query("QueryUserGroup") == []


def test_policies_allow_deny_wildcards_and_groups(node: Running, api: Api) -> None:
    env = build_zone(api)
    acme, _ = _account(api, node, "acme")
    for name in ("dave", "lucy"):
        acme.call("CreateUser", name=name, password=_digest(name))
    users = {u["name"]: u for u in acme.query("QueryUser")}
    dave = _user(node, "acme", "dave")
    # nothing is allowed by default, with a typed error that says why
    err = dave.fails("QueryVmInstance", conditions=[])
    assert err["code"] == "ID.1003" and "instance:APIQueryVmInstanceMsg" in err["details"]
    # an Allow of one API allows that one only
    one = _policy(acme, "query-vms", ("Allow", ["instance:APIQueryVmInstanceMsg"]))
    assert one["statements"] == [
        {"name": "statement0", "effect": "Allow", "actions": ["instance:APIQueryVmInstanceMsg"]}
    ]
    acme.call("AttachPolicyToUser", userUuid=users["dave"]["uuid"], policyUuid=one["uuid"])
    assert dave.query("QueryVmInstance") == []
    assert dave.fails("QueryVolume", conditions=[])["code"] == "ID.1003"
    # a wildcard over a category (glob, or ZStack's regular-expression idiom)
    vms = _policy(acme, "vm-all", ("Allow", ["instance:.*"]))
    acme.call("AttachPoliciesToUser", userUuid=users["dave"]["uuid"], policyUuids=[vms["uuid"]])
    spec = {"imageUuid": env["image"]["uuid"], "instanceOfferingUuid": env["offering"]["uuid"],
            "l3NetworkUuids": [env["l3"]["uuid"]]}
    vm = dave.call("CreateVmInstance", name="by-dave", **spec)["inventory"]
    # what a user makes is its account's
    assert [v["uuid"] for v in acme.query("QueryVmInstance")] == [vm["uuid"]]
    # Deny wins over any Allow
    no_stop = _policy(acme, "no-stop", ("Deny", ["instance:APIStopVmInstanceMsg"]), ("Allow", ["*"]))
    acme.call("AttachPolicyToUser", userUuid=users["dave"]["uuid"], policyUuid=no_stop["uuid"])
    err = dave.fails("StopVmInstance", uuid=vm["uuid"])
    assert err["code"] == "ID.1003" and "no-stop" in err["details"]
    dave.call("QueryVolume", conditions=[])  # the "*" of the same policy allows the rest
    perms = dave.call("CheckApiPermission", apiNames=["StopVmInstance", "APIRebootVmInstanceMsg", "CreateZone"])
    assert perms["inventory"] == {"StopVmInstance": "Deny", "APIRebootVmInstanceMsg": "Allow", "CreateZone": "Deny"}
    acme.call("DetachPoliciesFromUser", userUuid=users["dave"]["uuid"], policyUuids=[no_stop["uuid"], vms["uuid"]])
    assert dave.fails("StopVmInstance", uuid=vm["uuid"])["code"] == "ID.1003"  # no Allow left for it
    acme.call("DetachPolicyFromUser", userUuid=users["dave"]["uuid"], policyUuid=one["uuid"])
    assert dave.fails("QueryVmInstance", conditions=[])["code"] == "ID.1003"
    # a group's policies are its members'
    lucy = _user(node, "acme", "lucy")
    ops = acme.call("CreateUserGroup", name="ops")["inventory"]
    acme.call("AddUserToGroup", userUuid=users["lucy"]["uuid"], groupUuid=ops["uuid"])
    console = _policy(acme, "reboot", ("Allow", ["instance:APIRebootVmInstanceMsg", "instance:APIQueryVmInstanceMsg"]))
    acme.call("AttachPolicyToUserGroup", groupUuid=ops["uuid"], policyUuid=console["uuid"])
    assert [v["uuid"] for v in lucy.query("QueryVmInstance")] == [vm["uuid"]]
    assert lucy.fails("DestroyVmInstance", uuid=vm["uuid"])["code"] == "ID.1003"
    deny_group = _policy(acme, "deny-query", ("Deny", ["*:APIQuery*"]))
    acme.call("AttachPolicyToUserGroup", groupUuid=ops["uuid"], policyUuid=deny_group["uuid"])
    assert lucy.fails("QueryVmInstance", conditions=[])["code"] == "ID.1003"
    acme.call("DetachPolicyFromUserGroup", groupUuid=ops["uuid"], policyUuid=deny_group["uuid"])
    acme.call("RemoveUserFromGroup", userUuid=users["lucy"]["uuid"], groupUuid=ops["uuid"])
    assert lucy.fails("QueryVmInstance", conditions=[])["code"] == "ID.1003"
    # the account itself is never held by policies; deleting a policy detaches it
    acme.call("StopVmInstance", uuid=vm["uuid"])
    assert {p["name"] for p in acme.query("QueryPolicy")} == {"query-vms", "vm-all", "no-stop", "reboot", "deny-query"}
    acme.call("AttachPolicyToUser", userUuid=users["lucy"]["uuid"], policyUuid=console["uuid"])
    acme.call("DeletePolicy", uuid=console["uuid"])
    assert lucy.fails("QueryVmInstance", conditions=[])["code"] == "ID.1003"
    # bad statements are typed errors
    for bad in ([{"effect": "Maybe", "actions": ["*"]}], [{"effect": "Allow", "actions": []}], "not json", []):
        assert acme.fails("CreatePolicy", name="bad", statements=bad)["code"] == "SYS.1007"
    # the shell's way: statements as one JSON string
    text = acme.call("CreatePolicy", name="text", statements='[{"actions":["instance:.*"], "effect":"Allow"}]')
    assert text["inventory"]["statements"][0]["actions"] == ["instance:.*"]


def test_quotas_are_enforced_at_creation_with_their_own_code(node: Running, api: Api) -> None:
    env = build_zone(api)
    acme, acme_inv = _account(api, node, "acme")
    quotas = {q["name"]: q for q in api.query("QueryQuota", ("identityUuid", "=", acme_inv["uuid"]))}
    assert {"vm.num", "vm.cpuNum", "vm.memorySize", "volume.data.num", "volume.capacity", "eip.num", "l3.num",
            "vip.num", "securityGroup.num", "portForwarding.num"} <= set(quotas)
    assert quotas["vm.num"]["value"] == 20 and quotas["vm.num"]["identityType"] == "AccountVO"
    # an account reads its own quotas, not another's
    other, _ = _account(api, node, "other")
    assert other.query("QueryQuota", ("identityUuid", "=", acme_inv["uuid"])) == []
    assert len(acme.query("QueryQuota")) == len(quotas)
    updated = api.call("UpdateQuota", identityUuid=acme_inv["uuid"], name="vm.num", value=1)["inventory"]
    assert updated["value"] == 1
    assert acme.fails("UpdateQuota", identityUuid=acme_inv["uuid"], name="vm.num", value=100)["code"] == "ID.1003"
    assert api.fails("UpdateQuota", identityUuid=acme_inv["uuid"], name="vm.bogus", value=1)["code"] == "SYS.1007"
    assert api.fails("UpdateQuota", identityUuid=acme_inv["uuid"], name="vm.num", value=-1)["code"] == "SYS.1007"
    spec = {"imageUuid": env["image"]["uuid"], "instanceOfferingUuid": env["offering"]["uuid"],
            "l3NetworkUuids": [env["l3"]["uuid"]]}
    acme.call("CreateVmInstance", name="one", **spec)
    err = acme.fails("CreateVmInstance", name="two", **spec)
    assert err["code"] == "ID.1006" and "vm.num" in err["details"] and "1 of 1" in err["details"]
    assert len(acme.query("QueryVmInstance")) == 1  # nothing was made
    # memory: the offering's 128 MiB against a 64 MiB quota
    api.call("UpdateQuota", identityUuid=acme_inv["uuid"], name="vm.num", value=10)
    api.call("UpdateQuota", identityUuid=acme_inv["uuid"], name="vm.memorySize", value=200 << 20)
    err = acme.fails("CreateVmInstance", name="three", **spec)
    assert err["code"] == "ID.1006" and "vm.memorySize" in err["details"]
    # data volumes, by number and by capacity
    api.call("UpdateQuota", identityUuid=acme_inv["uuid"], name="volume.data.num", value=1)
    acme.call("CreateDataVolume", name="d1", diskOfferingUuid=env["disk"]["uuid"])
    err = acme.fails("CreateDataVolume", name="d2", diskOfferingUuid=env["disk"]["uuid"])
    assert err["code"] == "ID.1006" and "volume.data.num" in err["details"]
    api.call("UpdateQuota", identityUuid=acme_inv["uuid"], name="volume.data.num", value=10)
    usage = {u["name"]: u for u in acme.call("GetAccountQuotaUsage")["usages"]}
    api.call("UpdateQuota", identityUuid=acme_inv["uuid"], name="volume.capacity",
             value=usage["volume.capacity"]["used"] + (1 << 29))
    err = acme.fails("CreateDataVolume", name="d3", diskOfferingUuid=env["disk"]["uuid"])
    assert err["code"] == "ID.1006" and "volume.capacity" in err["details"]
    # L3 networks
    api.call("UpdateQuota", identityUuid=acme_inv["uuid"], name="l3.num", value=0)
    err = acme.fails("CreateL3Network", name="mine", l2NetworkUuid=env["l2"]["uuid"])
    assert err["code"] == "ID.1006" and "l3.num" in err["details"]
    # usage as the account sees it
    usage = {u["name"]: u for u in acme.call("GetAccountQuotaUsage")["usages"]}
    assert usage["vm.num"] == {"name": "vm.num", "total": 10, "used": 1}
    assert usage["vm.memorySize"]["used"] == 128 << 20 and usage["volume.data.num"]["used"] == 1
    assert api.call("GetAccountQuotaUsage", uuid=acme_inv["uuid"])["usages"] == acme.call("GetAccountQuotaUsage")[
        "usages"
    ]
    assert other.fails("GetAccountQuotaUsage", uuid=acme_inv["uuid"])["code"] == "SYS.1006"
    # the admin has no quotas
    api.call("CreateL3Network", name="admins", l2NetworkUuid=env["l2"]["uuid"])


def test_quota_holds_for_eips_too(node: Running, api: Api) -> None:
    from tests.integration.test_flat_network import public_l3

    env = build_zone(api)
    pub = public_l3(api, env)
    acme, acme_inv = _account(api, node, "acme")
    api.call("UpdateQuota", identityUuid=acme_inv["uuid"], name="vip.num", value=1)
    acme.call("CreateVip", name="v1", l3NetworkUuid=pub["uuid"])
    err = acme.fails("CreateVip", name="v2", l3NetworkUuid=pub["uuid"])
    assert err["code"] == "ID.1006" and "vip.num" in err["details"]
    api.call("UpdateQuota", identityUuid=acme_inv["uuid"], name="eip.num", value=0)
    (vip,) = acme.query("QueryVip")
    err = acme.fails("CreateEip", name="e", vipUuid=vip["uuid"])
    assert err["code"] == "ID.1006" and "eip.num" in err["details"]


def test_sharing_makes_a_resource_visible_and_usable_until_revoked(node: Running, api: Api) -> None:
    env = build_zone(api)
    alice, alice_inv = _account(api, node, "alice")
    bob, bob_inv = _account(api, node, "bob")
    carol, _ = _account(api, node, "carol")
    l3 = bob.call("CreateL3Network", name="bob-l3", l2NetworkUuid=env["l2"]["uuid"])["inventory"]
    bob.call("AddIpRange", l3NetworkUuid=l3["uuid"], name="r", startIp="198.19.0.10", endIp="198.19.0.20",
             netmask="255.255.255.0", gateway="198.19.0.1")
    volume = bob.call("CreateDataVolume", name="bob-vol", diskOfferingUuid=env["disk"]["uuid"])["inventory"]
    spec = {"imageUuid": env["image"]["uuid"], "instanceOfferingUuid": env["offering"]["uuid"],
            "l3NetworkUuids": [l3["uuid"]]}
    assert alice.fails("CreateVmInstance", name="a", **spec)["code"] == "SYS.1006"
    assert alice.query("QueryVolume") == []
    # alice cannot share what is not hers
    assert alice.fails("ShareResource", resourceUuids=[volume["uuid"]], toPublic=True)["code"] == "SYS.1006"
    bob.call("ShareResource", resourceUuids=[l3["uuid"], volume["uuid"]], accountUuids=[alice_inv["uuid"]])
    bob.call("ShareResource", resourceUuids=[volume["uuid"]], accountUuids=[alice_inv["uuid"]])  # once is enough
    shared = alice.query("QuerySharedResource")
    assert {(r["resourceUuid"], r["ownerAccountUuid"], r["receiverAccountUuid"], r["toPublic"]) for r in shared} == {
        (l3["uuid"], bob_inv["uuid"], alice_inv["uuid"], False),
        (volume["uuid"], bob_inv["uuid"], alice_inv["uuid"], False),
    }
    assert {r["resourceType"] for r in shared} == {"L3NetworkVO", "VolumeVO"}
    assert carol.query("QuerySharedResource") == []
    # alice sees and uses them; she may not change them; carol still sees nothing
    assert [v["uuid"] for v in alice.query("QueryVolume")] == [volume["uuid"]]
    vm = alice.call("CreateVmInstance", name="a", **spec)["inventory"]
    assert vm["vmNics"][0]["l3NetworkUuid"] == l3["uuid"]
    assert alice.fails("UpdateL3Network", uuid=l3["uuid"], name="mine")["code"] == "SYS.1006"
    assert alice.fails("DeleteDataVolume", uuid=volume["uuid"])["code"] == "SYS.1006"
    assert carol.query("QueryVolume") == []
    # who owns it
    owners = alice.call("GetResourceAccount", resourceUuids=[volume["uuid"], vm["uuid"]])["inventories"]
    assert owners[volume["uuid"]]["name"] == "bob" and owners[vm["uuid"]]["name"] == "alice"
    # revoked: gone again
    bob.call("RevokeResourceSharing", resourceUuids=[volume["uuid"]], accountUuids=[alice_inv["uuid"]])
    assert alice.query("QueryVolume", ("type", "=", "Data")) == []
    # to every account
    bob.call("ShareResource", resourceUuids=[volume["uuid"]], toPublic=True)
    assert [v["uuid"] for v in carol.query("QueryVolume")] == [volume["uuid"]]
    (public,) = carol.query("QuerySharedResource")
    assert public["toPublic"] is True and "receiverAccountUuid" not in public  # left out, never null
    bob.call("RevokeResourceSharing", resourceUuids=[volume["uuid"], l3["uuid"]], all=True)
    assert carol.query("QueryVolume") == [] and bob.query("QuerySharedResource") == []
    assert alice.fails("CreateVmInstance", name="b", **spec)["code"] == "SYS.1006"


def test_change_resource_owner_and_the_account_resource_refs(node: Running, api: Api) -> None:
    env = build_zone(api)
    alice, alice_inv = _account(api, node, "alice")
    bob, bob_inv = _account(api, node, "bob")
    volume = alice.call("CreateDataVolume", name="v", diskOfferingUuid=env["disk"]["uuid"])["inventory"]
    assert alice.fails("ChangeResourceOwner", accountUuid=bob_inv["uuid"], resourceUuid=volume["uuid"])["code"] == (
        "ID.1003"
    )
    ref = api.call("ChangeResourceOwner", accountUuid=bob_inv["uuid"], resourceUuid=volume["uuid"])["inventory"]
    assert ref["accountUuid"] == bob_inv["uuid"] and ref["resourceType"] == "VolumeVO"
    assert alice.query("QueryVolume") == [] and [v["uuid"] for v in bob.query("QueryVolume")] == [volume["uuid"]]
    refs = bob.query("QueryAccountResourceRef", ("resourceUuid", "=", volume["uuid"]))
    assert [r["accountUuid"] for r in refs] == [bob_inv["uuid"]]
    user = alice.call("CreateUser", name="u", password=_digest("u"))["inventory"]
    err = api.fails("ChangeResourceOwner", accountUuid=bob_inv["uuid"], resourceUuid=user["uuid"])
    assert err["code"] == "SYS.1005"
    # deleting an account takes its users, groups, policies and quotas with it
    alice.call("CreateUserGroup", name="g")
    _policy(alice, "p", ("Allow", ["*"]))
    api.call("DeleteAccount", uuid=alice_inv["uuid"])
    assert api.query("QueryUser", ("accountUuid", "=", alice_inv["uuid"])) == []
    assert api.query("QueryPolicy", ("accountUuid", "=", alice_inv["uuid"])) == []
    assert api.query("QueryQuota", ("identityUuid", "=", alice_inv["uuid"])) == []


def test_the_login_throttle_covers_users(node: Running, api: Api) -> None:
    api.call("UpdateGlobalConfig", category="identity", name="login.maxFailures", value="3")
    api.call("UpdateGlobalConfig", category="identity", name="login.lockSeconds", value="2")
    acme, _ = _account(api, node, "acme")
    acme.call("CreateUser", name="dave", password=_digest("right"))
    guesser = Api(node.url)
    for _ in range(3):
        reply = guesser.raw("LogInByUser", {"accountName": "acme", "userName": "dave", "password": WRONG})
        assert reply["error"]["code"] == "ID.1004"
    paused = guesser.raw("LogInByUser", {"accountName": "acme", "userName": "dave", "password": _digest("right")})
    assert paused["error"]["code"] == "ID.1005" and "acme/dave" in paused["error"]["details"]
    # the account itself is not paused by its user's guesser
    Api(node.url).login("acme", "acme")
    time.sleep(2.2)
    _user(node, "acme", "dave", "right")


def test_the_address_throttle_counts_user_logins(node: Running, api: Api) -> None:
    api.call("UpdateGlobalConfig", category="identity", name="login.maxFailuresPerAddress", value="3")
    api.call("UpdateGlobalConfig", category="identity", name="login.lockSeconds", value="30")
    acme, _ = _account(api, node, "acme")
    acme.call("CreateUser", name="dave", password=_digest("right"))
    guesser = Api(node.url)
    guesser.http = httpx.Client(timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.4"))
    for user in ("a", "b", "c"):
        guesser.raw("LogInByUser", {"accountName": "acme", "userName": user, "password": WRONG})
    paused = guesser.raw("LogInByUser", {"accountName": "acme", "userName": "dave", "password": _digest("right")})
    assert paused["error"]["code"] == "ID.1005" and "127.0.0.4" in paused["error"]["details"]
    # an account login from that address is paused too
    assert guesser.raw("LogInByAccount", {"accountName": "acme", "password": _digest("acme")})["error"]["code"] == (
        "ID.1005"
    )


def test_the_shell_drives_users_and_policies(node: Running, api: Api, tmp_path: Any, monkeypatch: Any,
                                             capsys: Any) -> None:
    import json

    from nimbostack.cli import main as cli

    monkeypatch.setenv("NIMBOSTACK_CLI_HOME", str(tmp_path / "cli"))

    def run(*words: str) -> tuple[int, dict[str, Any]]:
        capsys.readouterr()
        code = cli(["--port", str(node.port), *words])
        out = capsys.readouterr().out
        return code, json.loads(out) if out.strip().startswith("{") else {"raw": out}

    api.call("CreateAccount", name="ops-team", password=_digest("password"))
    assert run("LogInByAccount", "accountName=ops-team", "password=password")[0] == 0
    code, out = run("CreateUser", "name=david", "password=password")
    assert code == 0, out
    statements = """statements=[{"actions":["instance:.*"], "effect":"Allow"}]"""
    code, out = run("CreatePolicy", "name=vm-management", statements)
    assert code == 0 and out["inventory"]["statements"][0]["effect"] == "Allow", out
    code, _ = run("AttachPolicyToUser", f"userUuid={_uuid(api, 'QueryUser', 'david')}",
                  f"policyUuid={out['inventory']['uuid']}")
    assert code == 0
    assert run("LogInByUser", "accountName=ops-team", "userName=david", "password=password")[0] == 0
    code, out = run("QueryVmInstance")
    assert code == 0 and out["inventories"] == []
    code, out = run("QueryZone")
    assert code == 1 and out["error"]["code"] == "ID.1003"


def _uuid(api: Api, query: str, name: str) -> str:
    (row,) = api.query(query, ("name", "=", name))
    return str(row["uuid"])
