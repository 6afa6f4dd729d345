"""Every Query's inventories carry the API table's field names with ZStack 1.2's types (issue 13
item 8): a zone with every kind of resource the project makes, then each implemented Query."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime
from typing import Any

from sqlalchemy import select

from nimbostack.core import query, spec
from nimbostack.core.context import ROUTES
from nimbostack.db.engine import columns
from tests.conftest import Api, Running, build_zone
from tests.integration.test_flat_network import public_l3

DATE = re.compile(spec.DATE_PATTERN)
# what no API of the project makes yet: its queries answer, with nothing to check
NOTHING_TO_QUERY = {"QueryVirtualRouterVm"}


def every_resource(api: Api) -> dict[str, Any]:
    env = build_zone(api)
    pub = public_l3(api, env)
    api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=env["l3"]["uuid"],
             networkServices={env["flat"]["uuid"]: ["Eip"]})
    api.call("CreateL2VlanNetwork", name="vlan", zoneUuid=env["zone"]["uuid"], physicalInterface="eth0", vlan=10)
    vm = api.call("CreateVmInstance", name="vm", imageUuid=env["image"]["uuid"],
                  instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]])["inventory"]
    stopped = api.call("CreateVmInstance", name="stopped", imageUuid=env["image"]["uuid"],
                       instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]])["inventory"]
    api.call("StopVmInstance", uuid=stopped["uuid"])  # no host: a field left out, not null
    volume = api.call("CreateDataVolume", name="data", diskOfferingUuid=env["disk"]["uuid"])["inventory"]
    api.call("AttachDataVolumeToVm", vmInstanceUuid=vm["uuid"], volumeUuid=volume["uuid"])
    api.call("CreateVolumeSnapshot", volumeUuid=vm["rootVolumeUuid"], name="snap", description="before")
    vip = api.call("CreateVip", name="vip", l3NetworkUuid=pub["uuid"])["inventory"]
    api.call("CreateEip", name="eip", vipUuid=vip["uuid"], vmNicUuid=vm["vmNics"][0]["uuid"])
    api.call("CreateUserTag", resourceType="VmInstanceVO", resourceUuid=vm["uuid"], tag="web")
    api.call("CreateSystemTag", resourceType="VmInstanceVO", resourceUuid=vm["uuid"], tag="userdata::hello")
    sgp = api.query("QueryNetworkServiceProvider", ("type", "=", "SecurityGroup"))[0]
    api.call("AttachNetworkServiceProviderToL2Network", l2NetworkUuid=env["l2"]["uuid"],
             networkServiceProviderUuid=sgp["uuid"])
    api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=env["l3"]["uuid"],
             networkServices={sgp["uuid"]: ["SecurityGroup"]})
    sg = api.call("CreateSecurityGroup", name="sg", description="web")["inventory"]
    api.call("AddSecurityGroupRule", securityGroupUuid=sg["uuid"],
             rules=[{"type": "Ingress", "protocol": "TCP", "startPort": 22, "endPort": 22}])
    api.call("AttachSecurityGroupToL3Network", securityGroupUuid=sg["uuid"], l3NetworkUuid=env["l3"]["uuid"])
    api.call("AddVmNicToSecurityGroup", securityGroupUuid=sg["uuid"], vmNicUuids=[vm["vmNics"][0]["uuid"]])
    tenant = api.call("CreateAccount", name="tenant", password="0" * 128)["inventory"]
    user = api.call("CreateUser", name="user", password="0" * 128)["inventory"]
    group = api.call("CreateUserGroup", name="group")["inventory"]
    api.call("AddUserToGroup", userUuid=user["uuid"], groupUuid=group["uuid"])
    api.call("CreatePolicy", name="policy", statements=[{"effect": "Allow", "actions": ["instance:*"]}])
    api.call("ShareResource", resourceUuids=[volume["uuid"]], accountUuids=[tenant["uuid"]])
    api.call("UpdateGlobalConfig", category="vm", name="deletionPolicy", value="Delay")
    return env


def _check(where: str, inventory: Any, name: str, problems: list[str]) -> None:
    """``inventory`` has only the fields of ``name`` (or of a class extending it), each of its type."""
    if not isinstance(inventory, dict):
        problems.append(f"{where}: not an object: {inventory!r}")
        return
    typed: dict[str, str] = {}
    for kind in [name, *spec.inventory_subtypes(name)]:
        typed.update(spec.inventory_field_types(kind))
    listed = set().union(*(spec.inherited_inventory_fields(k) for k in [name, *spec.inventory_subtypes(name)]))
    if not listed:  # no field list in the table: its query object's plain fields, and the collections
        obj = spec.query_object_spec(f"QueryObject{name}")
        listed = {f for f in obj["primitiveFields"] if not f.startswith("__")}
        listed |= {f for f, t in typed.items() if t.startswith("list<")}
    for field, value in inventory.items():
        at = f"{where}.{field}"
        if field not in listed:
            problems.append(f"{at}: not a field of {name} in the API table")
        elif field not in typed:
            problems.append(f"{at}: the type table does not know it")
        else:
            _check_value(at, value, typed[field], problems)


def _check_value(at: str, value: Any, kind: str, problems: list[str]) -> None:
    if value is None:
        problems.append(f"{at}: null")
    elif kind.startswith("list<"):
        if not isinstance(value, list):
            problems.append(f"{at}: {value!r} is not a list")
            return
        for i, item in enumerate(value):
            _check_value(f"{at}[{i}]", item, kind[5:-1], problems)
    elif kind == "string" and not isinstance(value, str):
        problems.append(f"{at}: {value!r} is not a string")
    elif kind in ("int", "long") and (not isinstance(value, int) or isinstance(value, bool)):
        problems.append(f"{at}: {value!r} is not a number ({kind})")
    elif kind == "int" and not -(1 << 31) <= value < 1 << 31:
        problems.append(f"{at}: {value!r} does not fit a Java int")
    elif kind == "boolean" and not isinstance(value, bool):
        problems.append(f"{at}: {value!r} is not a boolean")
    elif kind == "timestamp":
        if not isinstance(value, str) or not DATE.match(value):
            problems.append(f"{at}: {value!r} is not in ZStack's date format (Apr 30, 2014 6:11:47 PM)")
        else:
            datetime.strptime(value, "%b %d, %Y %I:%M:%S %p")  # a real date, not just its shape
    elif kind == "object" and not isinstance(value, dict):
        problems.append(f"{at}: {value!r} is not an object")
    elif kind.endswith("Inventory"):
        _check(at, value, kind, problems)


def _stored(node: Running, target: query.QueryTarget) -> dict[str, dict[str, Any]]:
    """uuid → the row's non-null columns that the inventory lists: what it must carry."""
    fields = set(target.fields())

    async def read() -> dict[str, dict[str, Any]]:
        async with node.app.wire.platform.db.tx() as s:
            rows = (await s.execute(select(*columns(target.model)))).all()
        return {r.uuid: {k: v for k, v in r._mapping.items() if k in fields and v is not None} for r in rows}

    return asyncio.run_coroutine_threadsafe(read(), node.loop).result(timeout=60)


def test_every_query_answers_the_tables_fields_with_zstacks_types(node: Running, api: Api) -> None:
    every_resource(api)
    queries = sorted(n for n in ROUTES if n.startswith("Query"))
    assert len(queries) >= 28
    problems: list[str] = []
    checked = 0
    for name in queries:
        reply = api.call(name, conditions=[], replyWithCount=True)
        invs = reply["inventories"]
        assert reply["total"] == len(invs), name
        assert invs or name in NOTHING_TO_QUERY, f"{name}: the zone has no such resource"
        obj = spec.query_object(name)
        assert obj is not None
        inventory = obj[len("QueryObject") :]
        for i, inv in enumerate(invs):
            _check(f"{name}[{i}]", inv, inventory, problems)
            checked += 1
        target = query.TARGETS.get(obj)
        if target is not None and hasattr(target.model, "uuid"):
            stored = _stored(node, target)
            for inv in invs:
                missing = sorted(set(stored.get(inv.get("uuid"), {})) - set(inv))
                if missing:
                    problems.append(f"{name} {inv.get('uuid')}: the resource has {missing} but they are left out")
    assert checked > 60
    assert not problems, "\n".join(problems)


def test_the_type_table_types_every_field_the_api_table_lists() -> None:
    """The API table names each inventory's fields and the type table gives their types: for each
    inventory both know, the same names."""
    table = spec.table()["inventories"]
    typed = spec.inventory_types()["inventories"]
    for name, types in typed.items():
        if table.get(name):
            assert list(types) == table[name], name
        else:  # known from the query objects: their plain fields, and collections besides
            primitive = spec.query_object_spec(f"QueryObject{name}")["primitiveFields"]
            plain = [f for f in primitive if not f.startswith("__")]
            assert set(plain) <= set(types), (name, set(plain) - set(types))
            assert all(t.startswith("list<") or t == "object" for f, t in types.items() if f not in plain), name
    assert {n for n, fields in table.items() if fields} <= set(typed)
