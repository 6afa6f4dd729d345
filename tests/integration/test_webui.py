"""The web UI's endpoints on a real node (issue 15): the cookie session and its CSRF token, and
the server-sent events of the node's event bus, filtered per session."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import ssl
import threading
import time
from typing import Any

import httpx

from nimbostack.api import web
from tests.conftest import Api, Running, build_zone, wait_for


def agent_says(node: Running, host_uuid: str, vm_uuid: str, state: str) -> None:
    """An event on the agent wire, as the host's agent posts it when the hypervisor sees a VM
    change state (a guest halting, virsh): mutual TLS with the agent's own certificate."""
    ctx = ssl.create_default_context(cadata=(node.data_dir / "pki" / "ca.crt").read_text())
    ctx.load_cert_chain(str(node.data_dir / "agent" / "agent.pem"))
    r = httpx.post(f"https://127.0.0.1:{node.wire_port}/agent/events", verify=ctx, timeout=10,
                   json={"hostUuid": host_uuid, "vmUuid": vm_uuid, "state": state})
    assert r.status_code == 200, r.text


def ui_login(node: Running, name: str = "admin", password: str = "password") -> httpx.Client:
    client = httpx.Client(base_url=node.url, timeout=30)
    r = client.post("/ui/login", json={"accountName": name, "password": password})
    assert r.status_code == 200 and r.json()["success"], r.text
    return client


class Stream:
    """GET /ui/events read in a thread over a plain socket (which ``close`` can cut while a read
    waits): the events it carried, each with when it arrived."""

    def __init__(self, client: httpx.Client) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []
        url = httpx.URL(str(client.base_url))
        cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
        self._sock = socket.create_connection((url.host, url.port), timeout=10)
        self._sock.sendall(f"GET /ui/events HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nCookie: {cookie}\r\n"
                           "Accept: text/event-stream\r\n\r\n".encode())
        self._file = self._sock.makefile("rb")
        self.status = int(self._file.readline().split()[1])
        while self._file.readline().strip():  # the headers
            pass
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        # chunked transfer: a size line, then the chunk; the events are the chunks' data lines
        try:
            for raw in self._file:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("data: "):
                    self.events.append((time.monotonic(), json.loads(line[6:])))
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        # an open stream would hold the node's graceful shutdown until it ends
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)

    def about(self, uuid: str) -> list[dict[str, Any]]:
        return [e for _, e in self.events if e.get("uuid") == uuid]

    def wait(self, predicate: Any, timeout: float = 5.0) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, e in list(self.events):
                if predicate(e):
                    return at, e
            time.sleep(0.02)
        raise AssertionError(f"no such event in {timeout} s; got {[e for _, e in self.events]}")


def test_the_ui_session_is_an_httponly_strict_cookie_and_needs_its_csrf_token(node: Running, api: Api) -> None:
    client = httpx.Client(base_url=node.url, timeout=30)
    r = client.post("/ui/login", json={"accountName": "admin", "password": "wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "ID.1004" and "set-cookie" not in r.headers
    r = client.post("/ui/login", json={"accountName": "admin", "password": "password"})
    cookies = {c.split("=", 1)[0]: c.lower() for c in r.headers.get_list("set-cookie")}
    assert "httponly" in cookies[web.SESSION_COOKIE] and "samesite=strict" in cookies[web.SESSION_COOKIE]
    assert "httponly" not in cookies[web.CSRF_COOKIE] and "samesite=strict" in cookies[web.CSRF_COOKIE]
    token = client.cookies[web.SESSION_COOKIE]
    assert token not in r.text  # the page's scripts never see the session token
    body = {"APIQueryZoneMsg": {"conditions": []}}
    # no CSRF token, another session's, a foreign Origin: refused, nothing done
    assert client.post("/ui/api", json=body).status_code == 403
    assert client.post("/ui/api", json=body, headers={"X-CSRF-Token": web.csrf_token("x" * 32)}).status_code == 403
    csrf = {"X-CSRF-Token": client.cookies[web.CSRF_COOKIE]}
    evil = client.post("/ui/api", json={"APICreateZoneMsg": {"name": "evil"}}, headers={**csrf, "Origin": "http://evil"})
    assert evil.status_code == 403 and api.query("QueryZone") == []
    # with both: the API answers as to the cookie's session, whatever session the body names
    made = client.post("/ui/api", json={"APICreateZoneMsg": {"name": "z", "session": {"uuid": "forged"}}},
                       headers={**csrf, "Origin": node.url})
    assert made.status_code == 200 and made.json()["state"] in ("Done", "Processing")
    wait_for(lambda: api.query("QueryZone"), 10, "the zone the page created")
    assert [z["name"] for z in api.query("QueryZone")] == ["z"]
    assert client.get("/ui/session").json()["isAdmin"] is True
    # logging out ends the cookie's session
    assert client.post("/ui/logout", headers=csrf).status_code == 200
    gone = httpx.get(f"{node.url}/ui/session", cookies={web.SESSION_COOKIE: token}).json()
    assert gone["success"] is False and gone["error"]["code"] == "ID.1001"


def test_events_need_a_session_and_each_sees_only_its_own(node: Running, api: Api) -> None:
    env = build_zone(api)
    assert httpx.get(f"{node.url}/ui/events", timeout=10).status_code == 401
    bad = httpx.get(f"{node.url}/ui/events", cookies={web.SESSION_COOKIE: "0" * 32}, timeout=10)
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "ID.1001"
    api.call("CreateAccount", name="tenant", password=hashlib.sha512(b"tenant").hexdigest())
    tenant_api = Api(node.url)
    tenant_api.login("tenant", "tenant")
    admin, tenant = Stream(ui_login(node)), Stream(ui_login(node, "tenant", "tenant"))
    assert admin.status == 200 and tenant.status == 200
    vm = {"imageUuid": env["image"]["uuid"], "instanceOfferingUuid": env["offering"]["uuid"],
          "l3NetworkUuids": [env["l3"]["uuid"]]}
    admins = api.call("CreateVmInstance", name="admins", **vm)["inventory"]
    mine = tenant_api.call("CreateVmInstance", name="mine", **vm)["inventory"]
    admin.wait(lambda e: e["uuid"] == admins["uuid"] and e.get("phase") == "done")
    admin.wait(lambda e: e["uuid"] == mine["uuid"] and e.get("phase") == "done")
    tenant.wait(lambda e: e["uuid"] == mine["uuid"] and e.get("phase") == "done")
    # the hypervisor stops both (an agent's event): each stream carries what its session may see
    sent = time.monotonic()
    agent_says(node, admins["hostUuid"], admins["uuid"], "Stopped")
    agent_says(node, mine["hostUuid"], mine["uuid"], "Stopped")
    at, event = admin.wait(lambda e: e["uuid"] == admins["uuid"] and e.get("state") == "Stopped")
    assert at - sent < 2.0 and event["resourceType"] == "VmInstanceVO"
    tenant.wait(lambda e: e["uuid"] == mine["uuid"] and e.get("state") == "Stopped")
    admin.wait(lambda e: e["uuid"] == mine["uuid"] and e.get("state") == "Stopped")
    time.sleep(0.3)
    assert tenant.about(admins["uuid"]) == [], "a tenant's stream carried an event about the admin's VM"
    assert all("account" not in e for _, e in tenant.events + admin.events)
    # an admin's action on the tenant's VM reaches the tenant, the tenant's VM is still its own
    api.call("StartVmInstance", uuid=mine["uuid"])
    tenant.wait(lambda e: e["uuid"] == mine["uuid"] and e.get("api") == "StartVmInstance")
    admin.close()
    tenant.close()
