"""The spec's query language over the API, translated to SQL."""

from __future__ import annotations

import pytest

from tests.conftest import Api, build_zone


@pytest.fixture
def vms(api: Api) -> tuple[Api, dict, list[dict]]:
    env = build_zone(api, hosts=2)
    made = [api.call("CreateVmInstance", name=f"web-{i}" if i < 3 else f"db-{i}", imageUuid=env["image"]["uuid"],
                     instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]],
                     description=None if i == 4 else "d")["inventory"] for i in range(5)]
    return api, env, made


def names(rows: list[dict]) -> list[str]:
    return sorted(r["name"] for r in rows)


def test_every_operator(vms: tuple[Api, dict, list[dict]]) -> None:
    api, env, made = vms
    q = lambda *c, **k: api.query("QueryVmInstance", *c, **k)  # noqa: E731
    assert names(q(("name", "=", "web-0"))) == ["web-0"]
    assert names(q(("name", "!=", "web-0"))) == ["db-3", "db-4", "web-1", "web-2"]
    assert names(q(("name", "~=", "web%"))) == ["web-0", "web-1", "web-2"]
    assert names(q(("name", "!~=", "web%"))) == ["db-3", "db-4"]
    assert names(q(("name", "?=", "web-1,db-4"))) == ["db-4", "web-1"]
    assert names(q(("name", "!?=", "web-1,db-4"))) == ["db-3", "web-0", "web-2"]
    assert names(q(("description", "is null", None))) == ["db-4"]
    assert len(q(("description", "is not null", None))) == 4
    assert len(q(("memorySize", ">=", str(128 << 20)))) == 5
    assert q(("memorySize", ">", str(128 << 20))) == []
    assert len(q(("cpuNum", "<=", "1"))) == 5 and q(("cpuNum", "<", "1")) == []
    # two conditions are ANDed
    assert names(q(("name", "~=", "web%"), ("state", "=", "Running"))) == ["web-0", "web-1", "web-2"]


def test_nested_fields_sorting_paging_count_and_fields(vms: tuple[Api, dict, list[dict]]) -> None:
    api, env, made = vms
    assert len(api.query("QueryVmInstance", ("vmNics.l3NetworkUuid", "=", env["l3"]["uuid"]))) == 5
    assert len(api.query("QueryVmInstance", ("vmNics.l3Network.name", "=", "l3"))) == 5
    assert api.query("QueryVmInstance", ("vmNics.l3Network.name", "=", "nope")) == []
    ordered = api.query("QueryVmInstance", sortBy="name", sortDirection="desc", limit=2, start=1)
    assert [v["name"] for v in ordered] == ["web-1", "web-0"]
    assert api.call("QueryVmInstance", conditions=[], count=True) == {"success": True, "total": 5}
    reply = api.call("QueryVmInstance", conditions=[], replyWithCount=True, limit=1)
    assert reply["total"] == 5 and len(reply["inventories"]) == 1
    slim = api.query("QueryVmInstance", ("name", "=", "web-0"), fields=["uuid", "name"])
    assert slim == [{"uuid": made[0]["uuid"], "name": "web-0"}]
    # the spec's own example: fields=l2NetworkUuid, uuid=...
    assert api.query("QueryL3Network", ("uuid", "=", env["l3"]["uuid"]), fields=["l2NetworkUuid"]) == [
        {"l2NetworkUuid": env["l2"]["uuid"]}]
    hosts = api.query("QueryHost", ("vmInstance.name", "=", "web-0"))
    assert [h["uuid"] for h in hosts] == [made[0]["hostUuid"]]


def test_tag_conditions(vms: tuple[Api, dict, list[dict]]) -> None:
    api, env, made = vms
    api.call("CreateUserTag", resourceType="VmInstanceVO", resourceUuid=made[1]["uuid"], tag="team:red")
    assert names(api.query("QueryVmInstance", ("__userTag__", "=", "team:red"))) == ["web-1"]
    assert len(api.query("QueryVmInstance", ("__userTag__", "!=", "team:red"))) == 4


def test_bad_queries_are_clear_errors(vms: tuple[Api, dict, list[dict]]) -> None:
    api, *_ = vms
    err = api.fails("QueryVmInstance", conditions=[{"name": "nosuch", "op": "=", "value": "x"}])
    assert err["code"] == "SYS.1007" and "nosuch is not a queryable field" in err["details"]
    err = api.fails("QueryVmInstance", conditions=[{"name": "name", "op": "≈", "value": "x"}])
    assert "unknown query operator" in err["details"]
    err = api.fails("QueryVmInstance", conditions=[{"name": "memorySize", "op": ">", "value": "lots"}])
    assert "is a number" in err["details"]
    err = api.fails("QueryVmInstance", conditions=[{"name": "nics.ip", "op": "=", "value": "x"}])
    assert "not a nested field" in err["details"]
    err = api.fails("QueryVmInstance", conditions=[], sortDirection="sideways")
    assert "asc" in err["details"]


def test_queries_are_sql_not_python(vms: tuple[Api, dict, list[dict]], node) -> None:  # noqa: ANN001
    """The conditions reach the database: the statement's WHERE names the columns."""
    from nimbostack.core import query
    from nimbostack.core.auth import Caller

    target = query.TARGETS["QueryObjectVmInstanceInventory"]
    clauses = query.build(target, [{"name": "vmNics.ip", "op": "=", "value": "198.18.0.20"},
                                   {"name": "name", "op": "~=", "value": "web%"}], Caller("a" * 32, True))
    from sqlalchemy import select

    sql = str(select(target.model).where(*clauses))
    assert "vm_nic.ip = " in sql and "vm_instance.name LIKE" in sql
