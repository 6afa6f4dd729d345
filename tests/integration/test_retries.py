"""A client that lost an answer retries with the same ``resourceUuid`` (ZStack's client token) and
gets the resource the first call made, not a second one (issue 12, item 10)."""

from __future__ import annotations

import threading
import uuid

from tests.conftest import Api, Running, build_zone


def test_a_retried_create_vm_returns_the_first_vm(node: Running, api: Api) -> None:
    env = build_zone(api)
    token = uuid.uuid4().hex
    call = {"name": "vm", "imageUuid": env["image"]["uuid"], "instanceOfferingUuid": env["offering"]["uuid"],
            "l3NetworkUuids": [env["l3"]["uuid"]], "resourceUuid": token}
    # the retry arrives while the first call still works: both answer the one VM
    answers: list[dict] = []
    def create(client: Api) -> None:
        answers.append(client.call("CreateVmInstance", **call))

    threads = [threading.Thread(target=create, args=(c,)) for c in (api, _same_session(api, node))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [a["inventory"]["uuid"] for a in answers] == [token, token]
    assert {a["inventory"]["state"] for a in answers} == {"Running"}
    again = api.call("CreateVmInstance", **call)["inventory"]
    assert again["uuid"] == token and again["vmNics"] == answers[0]["inventory"]["vmNics"]
    assert [v["uuid"] for v in api.query("QueryVmInstance")] == [token]
    assert len(api.query("QueryVmNic")) == 1  # one NIC, one IP: nothing allocated twice
    # the same token for another VM is a mistake, said as such
    assert api.fails("CreateVmInstance", **{**call, "name": "other"})["code"] == "SYS.1005"


def test_a_uuid_taken_elsewhere_is_a_typed_error(node: Running, api: Api) -> None:
    token = uuid.uuid4().hex
    api.call("CreateZone", name="z1", resourceUuid=token)
    assert api.fails("CreateZone", name="z2", resourceUuid=token)["code"] == "SYS.1007"
    assert [z["name"] for z in api.query("QueryZone")] == ["z1"]


def _same_session(api: Api, node: Running) -> Api:
    other = Api(node.url)
    other.session = api.session
    return other
