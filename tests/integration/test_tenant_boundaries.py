"""One account cannot use another's resources through any API (issue 12, item 5): the check is
derived in dispatch from the uuids a call names, so a handler cannot forget it. The admin's
resources (images, offerings, public L3 networks) are shared by design."""

from __future__ import annotations

import hashlib

from tests.conftest import Api, Running, build_zone


def _account(api: Api, node: Running, name: str) -> Api:
    api.call("CreateAccount", name=name, password=hashlib.sha512(name.encode()).hexdigest())
    client = Api(node.url)
    client.login(name, name)
    return client


def test_another_accounts_uuid_is_no_resource_in_any_api(node: Running, api: Api) -> None:
    env = build_zone(api)
    alice, bob = _account(api, node, "alice"), _account(api, node, "bob")
    bobs_l3 = bob.call("CreateL3Network", name="bob-l3", l2NetworkUuid=env["l2"]["uuid"])["inventory"]
    vm = {"imageUuid": env["image"]["uuid"], "instanceOfferingUuid": env["offering"]["uuid"]}
    # CreateVmInstance took bob's L3 network from alice while UpdateL3Network said it did not exist
    err = alice.fails("CreateVmInstance", name="a", l3NetworkUuids=[bobs_l3["uuid"]], **vm)
    assert err["code"] == "SYS.1006" and bobs_l3["uuid"] in err["details"]
    err = alice.fails("CreateVmInstance", name="a", l3NetworkUuids=f"{env['l3']['uuid']},{bobs_l3['uuid']}", **vm)
    assert err["code"] == "SYS.1006"
    assert alice.fails("UpdateL3Network", uuid=bobs_l3["uuid"], name="mine")["code"] == "SYS.1006"
    assert alice.fails("CreateUserTag", resourceUuid=bobs_l3["uuid"], resourceType="L3NetworkVO", tag="x")[
        "code"
    ] == "SYS.1006"
    assert alice.query("QueryVmInstance") == []
    # the admin's image, offering and L3 network are shared: alice builds her VM from them
    mine = alice.call("CreateVmInstance", name="a", l3NetworkUuids=[env["l3"]["uuid"]], **vm)["inventory"]
    # and bob's own resources stay his to use; alice's VM is not his
    assert bob.fails("StopVmInstance", uuid=mine["uuid"])["code"] == "SYS.1006"
    bob.call("UpdateL3Network", uuid=bobs_l3["uuid"], name="still-mine")
    # the admin names anyone's
    api.call("UpdateL3Network", uuid=bobs_l3["uuid"], name="admin-was-here")
