"""The node's URLs beside the messages themselves: both spellings of the API's, its error envelope, /docs."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from tests.conftest import Api, Running

REPLY = "org.zstack.header.message.APIReply"


def _reply(answer: dict[str, Any]) -> dict[str, Any]:
    assert answer["state"] == "Done", answer
    (reply,) = json.loads(answer["result"]).values()
    return reply


def test_the_api_answers_with_and_without_a_trailing_slash(api: Api) -> None:
    body = {"org.zstack.header.zone.APIQueryZoneMsg": {"conditions": [], "session": {"uuid": api.session}}}
    for path in ("/zstack/api", "/zstack/api/"):  # ZStack's SDK posts to the second
        r = httpx.post(f"{api.base}{path}", json=body, timeout=30)
        assert r.status_code == 200, (path, r.text)
        assert _reply(r.json()) == {"success": True, "inventories": []}, path
    assert httpx.get(f"{api.base}/zstack/api", timeout=30).status_code == 405


def test_a_body_that_is_not_json_gets_the_typed_error_envelope(node: Running) -> None:
    r = httpx.post(f"{node.url}/zstack/api/", content=b"{not json", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    (name,) = json.loads(r.json()["result"])
    reply = _reply(r.json())
    assert name == REPLY and reply["success"] is False
    assert reply["error"]["code"] == "SYS.1007" and reply["error"]["details"]


def test_an_unknown_job_is_sys_1006_in_the_envelope(node: Running) -> None:
    r = httpx.get(f"{node.url}/zstack/api/result/no-such-job", timeout=30)
    assert r.status_code == 404
    reply = _reply(r.json())
    assert reply["success"] is False and reply["error"]["code"] == "SYS.1006"
    assert "no-such-job" in reply["error"]["details"]


def test_docs_is_a_page_that_needs_no_network(node: Running) -> None:
    r = httpx.get(f"{node.url}/docs", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "CreateVmInstance" in page and "org.zstack.header.vm.APICreateVmInstanceMsg" in page
    assert "l3NetworkUuids" in page
    # nothing fetched from elsewhere: no script at all, no stylesheet, image or import by URL
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//|@import|url\(""", page, re.IGNORECASE)
