"""An OpenAPI 3.1 document of the ZStack wire, generated from the API table: for every implemented
message its request (the fields, their kinds, which are mandatory, their valid values) and its
reply, with the inventories' fields and types; client generators and schema-driven testers
(schemathesis) read it.

The wire's ``result`` is a JSON string, as ZStack sends it. Its decoded content is described with
JSON Schema's ``contentMediaType``/``contentSchema`` (an annotation validators do not apply by
themselves: a checker decodes the string and validates it against ``contentSchema``). Each message
also has its own operation, ``POST /zstack/api/<full message name>``, a route the server serves
with the same body as ``/zstack/api``, so a fuzzer checks every message on its own."""

from __future__ import annotations

from functools import cache
from typing import Any

from nimbostack.api.dispatch import COMMON_FIELDS, FREE_OBJECT_LISTS, MAX_TIMEOUT_MS, OBJECT_LISTS
from nimbostack.core import spec
from nimbostack.core.context import ROUTES

SCHEMAS = "#/components/schemas/"
# a field the table gives no type: ZStack's Java fields are strings, numbers and booleans, and the
# server takes any of them in any of these forms ("10" or 10, "true" or true), as ZStack's CLI sends
SCALAR: dict[str, Any] = {"type": ["string", "integer", "number", "boolean"]}
# what the query operators of the table are called on the wire, in both spellings the server takes
QUERY_OPS = sorted({*spec.table()["queryOperators"], *spec.table()["queryOperators"].values()})
ERROR = {
    "type": "object",
    "required": ["code", "description"],
    "properties": {
        "code": {"type": "string"},
        "description": {"type": "string"},
        "details": {"type": "string"},
    },
}
JSON_TYPES = {
    "string": {"type": "string"},
    "int": {"type": "integer", "format": "int32"},
    "long": {"type": "integer", "format": "int64"},
    "boolean": {"type": "boolean"},
    "object": {"type": "object"},
    "timestamp": {"type": "string", "pattern": spec.DATE_PATTERN, "description": "e.g. Apr 30, 2014 6:11:47 PM"},
}


def _list_schema(items: dict[str, Any]) -> dict[str, Any]:
    # ZStack's CLI sends a list as one comma-separated string, which the server splits
    return {"anyOf": [{"type": "array", "items": items}, {"type": "string", "description": "comma-separated"}]}


def _field_schema(f: spec.FieldSpec) -> dict[str, Any]:
    enum = {"enum": list(f.valid_values)} if f.valid_values else {}
    if f.name == "rules":  # AddSecurityGroupRule's
        rule = {
            "type": "object",
            "required": ["type", "protocol"],
            "properties": {
                "type": {"enum": ["Ingress", "Egress"]},
                "protocol": {"enum": ["TCP", "UDP", "ICMP", "ALL"]},
                "startPort": {"type": "integer"},
                "endPort": {"type": "integer"},
                "allowedCidr": {"type": "string", "description": "IPv4 CIDR; 0.0.0.0/0 when left out"},
            },
        }
        return {"type": "array", "items": rule}
    if f.name in OBJECT_LISTS:
        condition = {
            "type": "object",
            "required": ["name", "op"],
            "properties": {
                "name": {"type": "string", "description": "a field, or a nested path (vmNics.ip)"},
                "op": {"enum": QUERY_OPS},
                "value": {"anyOf": [SCALAR, {"type": "array", "items": SCALAR}]},
            },
        }
        return {"type": "array", "items": condition}
    if f.name in FREE_OBJECT_LISTS:
        return {"anyOf": [{"type": "array", "items": {"type": "object"}}, {"type": "string", "description": "JSON"}]}
    if f.name == "networkServices":
        return {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}}
    if f.type == "list":
        return _list_schema({"type": "string", **enum})
    if f.type == "map":
        return {"type": "object"}
    return {**SCALAR, **enum}


def _request(msg: spec.MessageSpec) -> dict[str, Any]:
    common = {name: SCALAR for name in sorted(COMMON_FIELDS)}
    common["session"] = {"type": "object", "properties": {"uuid": {"type": "string"}}}
    common["timeout"] = {"type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT_MS, "description": "milliseconds"}
    for tags in ("systemTags", "userTags"):
        common[tags] = _list_schema({"type": "string"})
    params = {**common, **{f.name: _field_schema(f) for f in msg.fields.values()}}
    required = [f.name for f in msg.fields.values() if f.mandatory and f.name not in OBJECT_LISTS]
    body: dict[str, Any] = {"type": "object", "properties": params, "additionalProperties": False}
    if required:
        body["required"] = required
    return {
        "type": "object",
        "additionalProperties": False,
        "required": [msg.full_name],
        "properties": {msg.full_name: body},
    }


def _type_schema(kind: str) -> dict[str, Any]:
    if kind.startswith("list<"):
        return {"type": "array", "items": _type_schema(kind[5:-1])}
    if kind in JSON_TYPES:
        return dict(JSON_TYPES[kind])
    return {"$ref": f"{SCHEMAS}{kind}"}


def inventory_schema(name: str) -> dict[str, Any]:
    """The fields an inventory of ``name`` (or of a class that extends it) may carry, each typed;
    no other field. An unset field is left out, never null; a query's ``fields`` leaves out the
    others, so none is required."""
    props: dict[str, Any] = {}
    for kind in [name, *spec.inventory_subtypes(name)]:
        typed = spec.inventory_field_types(kind)
        for field in spec.inherited_inventory_fields(kind) or typed:
            props.setdefault(field, _type_schema(typed[field]) if field in typed else {})
    if not props:  # an inventory only the table's query objects name: their plain fields
        obj = spec.query_object_spec(f"QueryObject{name}")
        props = {f: {} for f in obj["primitiveFields"] if not f.startswith("__")}
    return {"type": "object", "additionalProperties": False, "properties": props}


def query_inventory(msg: spec.MessageSpec) -> str | None:
    """``QueryVmInstance`` → ``VmInstanceInventory``."""
    obj = spec.query_object(msg.name)
    return obj[len("QueryObject") :] if obj else None


def _reply(msg: spec.MessageSpec, inventories: set[str]) -> dict[str, Any]:
    full = spec.reply_name(msg)
    props: dict[str, Any] = {"success": {"type": "boolean"}, "error": {"$ref": f"{SCHEMAS}ErrorCode"}}
    table_reply = spec.table()["messages"].get(full.rsplit(".", 1)[-1])
    inventory = query_inventory(msg)
    if table_reply is not None:
        for f in table_reply["fields"]:
            props.setdefault(f["name"], {"type": "array"} if f.get("type") == "list" else {})
        if inventory and "inventories" in props:
            inventories.add(inventory)
            props["inventories"] = {"type": "array", "items": {"$ref": f"{SCHEMAS}{inventory}"}}
            props["total"] = {"type": "integer", "minimum": 0}
    elif msg.name.startswith(("Create", "Add", "Update", "Change", "Attach", "Detach")):
        props["inventory"] = {"type": "object"}
    body = {
        "type": "object",
        "required": ["success"],
        "properties": props,
        # the table lists a reply's fields; an event's (not in the table) are ZStack's own choice
        "additionalProperties": table_reply is None,
    }
    return {"type": "object", "additionalProperties": False, "required": [full], "properties": {full: body}}


def _state(state: str, props: dict[str, Any]) -> dict[str, Any]:
    """One of the wire's two answers: ``state`` and the fields that go with it, all of them sent."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["state", *(p for p in props if p != "progress")],
        "properties": {"state": {"const": state}, **props},
    }


def _answer(reply: dict[str, Any]) -> dict[str, Any]:
    result = {"type": "string", "contentMediaType": "application/json", "contentSchema": reply}
    job = {"type": "string", "description": "poll GET /zstack/api/result/{uuid}"}
    processing = _state("Processing", {"uuid": job, "progress": {"type": "string"}})
    return {"oneOf": [_state("Done", {"result": result}), processing]}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


@cache
def openapi_document() -> dict[str, Any]:
    schemas: dict[str, Any] = {"ErrorCode": ERROR}
    paths: dict[str, Any] = {}
    inventories: set[str] = set()
    requests, replies = [], []
    for name in sorted(ROUTES):
        msg = spec.messages()[name]
        schemas[name] = _request(msg)
        schemas[f"{name}Reply"] = _reply(msg, inventories)
        requests.append({"$ref": f"{SCHEMAS}{name}"})
        replies.append({"$ref": f"{SCHEMAS}{name}Reply"})
        paths[f"/zstack/api/{msg.full_name}"] = {
            "post": {
                "operationId": name,
                "summary": f"{name} ({'reply' if spec.is_synchronous(msg) else 'event: may run as a job'})",
                "description": f"The body of POST /zstack/api for {msg.full_name}, posted at its own path.",
                "requestBody": {"required": True, "content": {"application/json": {"schema": requests[-1]}}},
                "responses": {"200": _json("Done, or Processing", _answer(replies[-1]))},
            }
        }
    # the inventories that the replies name, and those that they nest, each once
    pending = sorted(inventories)
    while pending:
        inv = pending.pop()
        if inv in schemas:
            continue
        schemas[inv] = inventory_schema(inv)
        for prop in schemas[inv]["properties"].values():
            ref = prop.get("$ref") or prop.get("items", {}).get("$ref")
            if ref:
                pending.append(ref[len(SCHEMAS) :])
    any_reply = {"type": "object", "minProperties": 1, "maxProperties": 1, "additionalProperties": {
        "type": "object", "required": ["success"], "properties": {"success": {"type": "boolean"}}}}
    paths["/zstack/api"] = {
        "post": {
            "operationId": "api",
            "summary": "Call an API message",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": requests}}}},
            "responses": {"200": _json("Done, or Processing", _answer({"anyOf": replies}))},
        }
    }
    paths["/zstack/api/result/{uuid}"] = {
        "get": {
            "operationId": "result",
            "summary": "Poll an API job",
            "parameters": [{"name": "uuid", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": _json("Done, or still Processing", _answer(any_reply)),
                "404": _json("No such job", _answer(any_reply)),
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "nimbostack (ZStack-compatible API)", "version": "1.2"},
        "paths": paths,
        "components": {"schemas": schemas},
    }
