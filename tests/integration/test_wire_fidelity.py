"""The wire as ZStack's own clients read it (issue 13)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from nimbostack.core import spec
from nimbostack.core.context import ROUTES
from nimbostack.plugins.flat.service import with_cloud_config_header
from tests.conftest import Api, Running, build_zone
from tests.integration.test_flat_network import entry_of, make_vm

# release 1.0 §2.2.2, as the notes write it: minified YAML, newlines as \n, no #cloud-config line
NOTES_USERDATA = (
    "userdata::groups:\\n  - ubuntu: [foo,bar]\\n  - cloud-users\\n\\n# Add users to the system. Users are added "
    "after groups are added.\\nusers:\\n  - default\\n  - name: foobar\\n    gecos: Foo B. Bar\\n    primary-group: "
    "foobar\\n    groups: users\\n    selinux-user: staff_u\\n    expiredate: 2012-09-01\\n    ssh-import-id: foobar"
    "\\n    lock-passwd: false\\n  - name: barfoo\\n    gecos: Bar B. Foo\\n    sudo: ALL=(ALL) NOPASSWD:ALL\\n    "
    "groups: users, admin\\n    ssh-import-id: None\\n    lock-passwd: true\\n    ssh-authorized-keys:\\n      - "
    "<ssh pub key 1>\\n      - <ssh pub key 2>\\n  - name: cloudy\\n    gecos: Magic Cloud App Daemon User\\n    "
    "inactive: true\\n    system: true"
)


def _raw_result(node: Running, api: Api, name: str, params: dict[str, Any]) -> str:
    body = {spec.messages()[name].full_name: {**params, "session": {"uuid": api.session}}}
    answer = httpx.post(f"{node.url}/zstack/api", json=body, timeout=60).json()
    while answer["state"] == "Processing":
        answer = httpx.get(f"{node.url}/zstack/api/result/{answer['uuid']}", timeout=60).json()
    return str(answer["result"])


def test_no_null_anywhere_in_any_reply(node: Running, api: Api) -> None:
    """zstacklib's JSON parser raises on a null: Gson, ZStack's, leaves unset fields out."""
    env = build_zone(api)
    vm = api.call("CreateVmInstance", name="vm", imageUuid=env["image"]["uuid"],
                  instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]])["inventory"]
    api.call("StopVmInstance", uuid=vm["uuid"])  # a stopped VM has no host: a field left unset
    queries = sorted(n for n in ROUTES if n.startswith("Query"))
    assert len(queries) > 20
    for name in queries:
        result = _raw_result(node, api, name, {"conditions": []})
        assert "null" not in result.replace('"null"', ""), (name, result[:300])
        assert json.loads(result), name
    create = _raw_result(node, api, "CreateZone", {"name": "z"})  # description never given
    assert "null" not in create and '"description"' not in create


def test_the_notes_userdata_split_at_commas_by_zstack_cli_arrives_whole_with_a_header(node: Running, api: Api) -> None:
    """ZStack's CLI splits list parameters at every comma, the userdata's "[foo,bar]" and "users,
    admin" too; the pieces are joined back, and the header-less YAML is served as #cloud-config."""
    env = build_zone(api)
    pieces = NOTES_USERDATA.split(",")
    assert len(pieces) == 3
    vm = make_vm(api, env, systemTags=pieces)
    (tag,) = [t["tag"] for t in api.query("QuerySystemTag", ("resourceUuid", "=", vm["uuid"]))
              if t["tag"].startswith("userdata::")]
    assert tag == NOTES_USERDATA
    served = entry_of(node, vm, env["l3"]["uuid"])["userdata"]
    assert served == "#cloud-config\n" + NOTES_USERDATA[len("userdata::"):].replace("\\n", "\n")


def test_userdata_with_a_header_or_no_mapping_is_served_byte_for_byte() -> None:
    for text in ("#cloud-config\nusers: []", "#!/bin/sh\necho hi", "Content-Type: multipart/mixed; boundary=x\n",
                 "just some words", "- a\n- list", "key: [unclosed"):
        assert with_cloud_config_header(text) == text
    assert with_cloud_config_header("hostname: vm1") == "#cloud-config\nhostname: vm1"
