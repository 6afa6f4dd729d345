"""An OpenAPI document of the ZStack wire, generated from the API table: one request schema per
API message, so client generators and schema-driven testers know every name and field."""

from __future__ import annotations

from functools import cache
from typing import Any

from nimbostack.core import spec
from nimbostack.core.context import ROUTES


def _field_schema(f: spec.FieldSpec) -> dict[str, Any]:
    if f.type == "list":
        schema: dict[str, Any] = {"type": "array", "items": {}}
    elif f.type == "map" or f.name == "networkServices":
        schema = {"type": "object"}
    else:
        schema = {}
    if f.valid_values:
        schema["enum"] = list(f.valid_values)
    return schema


@cache
def openapi_document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    refs = []
    for name in sorted(ROUTES):
        msg = spec.messages()[name]
        params = {f.name: _field_schema(f) for f in msg.fields.values()}
        params["session"] = {"type": "object", "properties": {"uuid": {"type": "string"}}}
        params["timeout"] = {"type": "integer", "description": "milliseconds"}
        required = [f.name for f in msg.fields.values() if f.mandatory]
        schemas[name] = {
            "type": "object",
            "additionalProperties": False,
            "required": [msg.full_name],
            "properties": {msg.full_name: {"type": "object", "properties": params, "required": required}},
        }
        refs.append({"$ref": f"#/components/schemas/{name}"})
    answer = {
        "type": "object",
        "properties": {
            "state": {"type": "string", "enum": ["Processing", "Done"]},
            "uuid": {"type": "string"},
            "result": {"type": "string", "description": "JSON: {reply name: {success, error, inventory|...}}"},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "nimbostack (ZStack-compatible API)", "version": "1.2"},
        "paths": {
            "/zstack/api": {
                "post": {
                    "summary": "Call an API message",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": refs}}}},
                    "responses": {
                        "200": {
                            "description": "Done or Processing",
                            "content": {"application/json": {"schema": answer}},
                        }
                    },
                }
            },
            "/zstack/api/result/{uuid}": {
                "get": {
                    "summary": "Poll an API job",
                    "parameters": [{"name": "uuid", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {
                        "200": {
                            "description": "Done or Processing",
                            "content": {"application/json": {"schema": answer}},
                        }
                    },
                }
            },
        },
        "components": {"schemas": schemas},
    }
