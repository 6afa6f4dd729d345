"""schemathesis over /openapi.json (issue 13 item 7): every operation of the document (each
implemented message at its own path, the shared /zstack/api and the job poll) gets generated
bodies; no answer may be a server error (HTTP 5xx, or SYS.1000 inside a reply) or break the
document's response schema, the decoded ``result`` included."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from nimbostack.core.errors import INTERNAL
from tests.conftest import Api, Running
from tests.integration.test_inventories import every_resource

# generated bodies per operation: enough to reach every field's kinds and valid values at least
# once for most messages, few enough that the ~150 operations take about a minute on 2 cores
EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _internal_errors(value: Any) -> bool:
    if isinstance(value, dict):
        return value.get("code") == INTERNAL or any(_internal_errors(v) for v in value.values())
    if isinstance(value, list):
        return any(_internal_errors(v) for v in value)
    return False


class Decoded:
    """The check schemathesis cannot make: the wire's ``result`` is a JSON string, so it is decoded
    (after polling a job to its end) and validated against the document's ``contentSchema``."""

    def __init__(self, doc: dict[str, Any], base: str) -> None:
        self.root = {"components": doc["components"]}
        self.base = base
        self.validators: dict[str, jsonschema_rs.Validator] = {}

    def validator(self, operation: dict[str, Any]) -> jsonschema_rs.Validator:
        key = operation["operationId"]
        if key not in self.validators:
            answer = operation["responses"]["200"]["content"]["application/json"]["schema"]
            content = answer["oneOf"][0]["properties"]["result"]["contentSchema"]
            self.validators[key] = jsonschema_rs.Draft202012Validator({**self.root, **content})
        return self.validators[key]

    def problems(
        self, operation: dict[str, Any], answer: dict[str, Any], http: httpx.Client, seen: Counter[str]
    ) -> list[str]:
        deadline = time.monotonic() + 60
        while answer.get("state") == "Processing" and time.monotonic() < deadline:
            answer = http.get(f"{self.base}/zstack/api/result/{answer['uuid']}").json()
        if answer.get("state") != "Done":
            return [f"the job did not end: {answer}"]
        result = json.loads(answer["result"])
        for reply in result.values():
            seen["success" if reply.get("success") else reply.get("error", {}).get("code", "?")] += 1
        found = [f"{e.instance_path}: {e.message}" for e in self.validator(operation).iter_errors(result)]
        if _internal_errors(result):
            found.append(f"an internal error: {answer['result'][:500]}")
        return found


class Fuzz:
    """The run over every operation: what was called and what failed."""

    def __init__(self, node: Running, api: Api, doc: dict[str, Any]) -> None:
        self.node, self.api, self.doc = node, api, doc
        self.decoded = Decoded(doc, node.url)
        self.http = httpx.Client(timeout=60)
        self.failures: list[str] = []
        self.calls = 0
        self.outcomes: Counter[str] = Counter()  # success, or the error code: how deep the bodies reached

    def operation(self, operation: schemathesis.APIOperation) -> None:
        raw = self.doc["paths"][operation.path][operation.method.lower()]

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,  # the same bodies on every run: a failure in CI reproduces here
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def one(case: schemathesis.Case) -> None:
            self.case(raw, case)

        one()

    def case(self, raw: dict[str, Any], case: schemathesis.Case) -> None:
        if isinstance(case.body, dict) and len(case.body) == 1:
            ((name, fields),) = case.body.items()
            # an admin's session reaches the handlers; LogOut's own stays generated, or it would
            # end the session of all the other calls
            if isinstance(fields, dict) and not name.endswith("APILogOutMsg"):
                fields["session"] = {"uuid": self.api.session}
        self.calls += 1
        response = case.call(base_url=self.node.url)
        where = f"{raw['operationId']} {json.dumps(case.body, default=str)[:300]} {case.path_parameters or ''}"
        try:
            case.validate_response(response, checks=CHECKS)
        except Exception as err:  # noqa: BLE001  (schemathesis raises a group of its failures)
            self.failures.append(f"{where}: {err}")
            return
        if response.status_code == 200 and "requestBody" in raw:
            found = self.decoded.problems(raw, response.json(), self.http, self.outcomes)
            self.failures += [f"{where}: {p}" for p in found]


def test_schemathesis_finds_no_server_error_and_no_schema_violation(node: Running, api: Api) -> None:
    every_resource(api)  # so that the queries' answers, checked against the document, hold every inventory
    doc = httpx.get(f"{node.url}/openapi.json").json()
    schema = schemathesis.openapi.from_dict(doc)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(doc["paths"]) > 150
    fuzz = Fuzz(node, api, doc)
    started = time.monotonic()
    for operation in operations:
        fuzz.operation(operation)
    elapsed = time.monotonic() - started
    print(f"schemathesis: {len(operations)} operations, {fuzz.calls} calls, {elapsed:.0f} s, {dict(fuzz.outcomes)}")
    assert fuzz.calls >= len(operations)
    assert not fuzz.failures, f"{len(fuzz.failures)} failures:\n" + "\n".join(fuzz.failures[:40])


@pytest.mark.parametrize("name", ["org.zstack.header.zone.APIQueryZoneMsg", "org.zstack.header.zone.APICreateZoneMsg"])
def test_a_message_answers_at_its_own_path_as_at_the_shared_one(node: Running, api: Api, name: str) -> None:
    body = {name: {"conditions": [], "session": {"uuid": api.session}}}
    if "Create" in name:
        body = {name: {"name": "z", "session": {"uuid": api.session}}}
    own = httpx.post(f"{node.url}/zstack/api/{name}", json=body).json()
    (reply,) = json.loads(own["result"]).values()
    assert reply["success"], reply
    other = "org.zstack.header.zone.APIDeleteZoneMsg"
    wrong = httpx.post(f"{node.url}/zstack/api/{other}", json=body).json()
    (reply,) = json.loads(wrong["result"]).values()
    assert not reply["success"] and reply["error"]["code"] == "SYS.1007"
