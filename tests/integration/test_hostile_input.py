"""Every implemented API answers bad input with a typed error, never SYS.1000 (issue 12, item 8):
each field of each message gets the families of bad values a fuzzer would send, on top of
mandatory fields that name real resources, so the handlers themselves are reached."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx

from nimbostack.core import spec
from nimbostack.core.context import ROUTES
from tests.conftest import Api, Running, build_zone

BAD: list[Any] = [
    10**30, -(10**30), -1, 1.5, True, "", "1e30", "../../etc/passwd", "a\x00b", "x" * 5000,
    ["a", ["b"]], {"x": {"y": 1}}, [], {},
]
# calls that would take the zone away from under the calls after them
DESTRUCTIVE = {
    "LogOut", "DeleteAccount", "ChangeHostState", "DeleteHost", "DeleteZone", "DeleteCluster", "DeleteL2Network",
    "DeleteL3Network", "DeleteImage", "ExpungeImage", "DeletePrimaryStorage", "DeleteBackupStorage",
    "DetachPrimaryStorageFromCluster", "DetachBackupStorageFromZone", "DetachL2NetworkFromCluster",
}


def test_no_bad_value_in_any_field_of_any_implemented_message_is_an_internal_error(node: Running, api: Api) -> None:
    env = build_zone(api)
    real = {
        "zoneUuid": env["zone"]["uuid"], "clusterUuid": env["cluster"]["uuid"], "l2NetworkUuid": env["l2"]["uuid"],
        "l3NetworkUuid": env["l3"]["uuid"], "imageUuid": env["image"]["uuid"], "hostUuid": env["hosts"][0]["uuid"],
        "instanceOfferingUuid": env["offering"]["uuid"],
    }
    internal: list[str] = []
    calls = 0
    for name in sorted(set(ROUTES) - DESTRUCTIVE):
        msg = spec.messages()[name]
        base = {
            f.name: real.get(f.name, uuid.uuid4().hex if f.name.endswith("Uuid") else [] if f.type == "list" else "x")
            for f in msg.fields.values()
            if f.mandatory and f.name not in ("systemTags", "userTags")
        }
        for f in msg.fields.values():
            for bad in BAD:
                reply = api.raw(name, {**base, f.name: bad})  # asserts HTTP 200
                calls += 1
                if not reply["success"] and reply["error"]["code"] == "SYS.1000":
                    internal.append(f"{name}.{f.name}={bad!r:.40}: {reply['error']['details']:.120}")
    assert calls > 5000
    assert internal == [], f"{len(internal)} of {calls} calls answered SYS.1000:\n" + "\n".join(internal[:40])


def test_the_shapes_no_handler_should_see_are_refused_at_the_door(node: Running, api: Api) -> None:
    for params in (
        {"name": "vm\x00name"},
        {"name": "x" * 256},
        {"name": "z", "description": "d" * 2049},
        {"name": "z", "userTags": [["nested"]]},
        {"name": "z", "description": "x" * (2 << 20)},
    ):
        assert api.fails("CreateZone", **params)["code"] == "SYS.1007", params
    assert api.fails("QueryZone", conditions=[], limit=10**30)["code"] == "SYS.1007"
    assert api.fails("QueryZone", conditions=[], fields=[["name"]])["code"] == "SYS.1007"
    assert api.query("QueryZone") == []
    # a body nested past the JSON parser's depth
    deep = '{"org.zstack.header.zone.APIQueryZoneMsg": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = httpx.post(f"{node.url}/zstack/api", content=deep, timeout=30)
    assert r.status_code == 200
    (reply,) = json.loads(r.json()["result"]).values()
    assert reply["error"]["code"] == "SYS.1007"
