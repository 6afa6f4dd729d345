"""The console proxy (issue 15 item 5) on simulated hosts: RequestConsoleAccess's one-time tokens,
the node's /console/ws WebSocket, the agent's /vm/vnc tunnel and the page.

A simulated host has no VNC server; its agent answers the tunnel with a fake one that speaks RFB
3.8 far enough to say so (the greeting, then a refused handshake whose reason is "no VNC on a
simulated host"), so every byte here went browser → node → agent wire → agent and back."""

from __future__ import annotations

import hashlib
import re
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from nimbostack.agent.drivers.simulator import SIMULATED_VNC_REASON
from nimbostack.wire import pki
from tests.conftest import Api, Running, build_zone


def _vm(api: Api, env: dict[str, Any], name: str = "vm") -> dict[str, Any]:
    return api.call("CreateVmInstance", name=name, imageUuid=env["image"]["uuid"],
                    instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]])["inventory"]


def _socket_url(node: Running, vm_uuid: str, token: str) -> str:
    return f"ws://127.0.0.1:{node.port}/console/ws?vmInstanceUuid={vm_uuid}&token={token}"


def _refusal(url: str) -> tuple[int, str]:
    """The close code and reason of a console socket that must be refused before any RFB byte."""
    with connect(url, open_timeout=10) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            data = ws.recv(timeout=10)
            pytest.fail(f"a refused console sent {data!r}")
    rcvd = closed.value.rcvd
    assert rcvd is not None
    return rcvd.code, rcvd.reason


def _greeted(ws: ClientConnection) -> bytes:
    """The simulated VNC server's greeting and, after our version, its refusal reason."""
    greeting = ws.recv(timeout=10)
    ws.send(b"RFB 003.008\n")
    answer = ws.recv(timeout=10)
    assert isinstance(greeting, bytes) and isinstance(answer, bytes)
    assert answer[0] == 0  # no security types: the reason follows
    (length,) = struct.unpack(">I", answer[1:5])
    assert answer[5:5 + length].decode() == SIMULATED_VNC_REASON
    return greeting


class Opens:
    """The simulated hosts' VNC connections the agent made (to prove a refusal reached none)."""

    def __init__(self, node: Running, monkeypatch: pytest.MonkeyPatch) -> None:
        self.vms: list[str] = []
        for driver in node.agent_server.agent.drivers.values():
            real = driver.open_vnc

            async def counted(vm_uuid: str, real: Any = real) -> Any:
                self.vms.append(vm_uuid)
                return await real(vm_uuid)

            monkeypatch.setattr(driver, "open_vnc", counted)


@pytest.fixture
def env(api: Api) -> dict[str, Any]:
    return build_zone(api)


@pytest.fixture
def opens(env: dict[str, Any], node: Running, monkeypatch: pytest.MonkeyPatch) -> Iterator[Opens]:
    yield Opens(node, monkeypatch)


def _no_nulls(value: Any) -> bool:
    if isinstance(value, dict):
        return all(v is not None and _no_nulls(v) for v in value.values())
    if isinstance(value, list):
        return all(v is not None and _no_nulls(v) for v in value)
    return True


def test_a_console_url_opens_the_vms_console_once_through_the_node(
    api: Api, node: Running, env: dict[str, Any], opens: Opens
) -> None:
    vm = _vm(api, env)
    host_ip = env["hosts"][0]["managementIp"]
    vnc_port = api.call("GetVmConsoleAddress", uuid=vm["uuid"])["port"]
    reply = api.call("RequestConsoleAccess", vmInstanceUuid=vm["uuid"])
    assert _no_nulls(reply)
    inv = reply["inventory"]
    # the node's address, never the host's: the browser learns neither the host nor its VNC port
    assert (inv["scheme"], inv["hostname"], inv["port"], inv["vmInstanceUuid"]) == (
        "vnc", "127.0.0.1", node.port, vm["uuid"])
    assert host_ip not in str(inv) and str(vnc_port) not in str(inv)
    assert len(inv["token"]) >= 32 and inv["token"] in inv["url"] and inv["token"] in inv["webSocketUrl"]
    assert inv["url"].startswith(f"{node.url}/console/?") and inv["webSocketUrl"].startswith(
        f"ws://127.0.0.1:{node.port}/console/ws?")

    # opening the page spends nothing: the socket does
    assert httpx.get(inv["url"]).status_code == 200
    with connect(inv["webSocketUrl"], open_timeout=10) as ws:
        assert _greeted(ws) == b"RFB 003.008\n"
    assert opens.vms == [vm["uuid"]]

    code, reason = _refusal(inv["webSocketUrl"])
    assert code == 1008 and "already used" in reason
    assert opens.vms == [vm["uuid"]]
    # a new URL is a new token
    again = api.call("RequestConsoleAccess", vmInstanceUuid=vm["uuid"])["inventory"]
    assert again["token"] != inv["token"]
    with connect(again["webSocketUrl"], open_timeout=10, subprotocols=["binary"]) as ws:  # as noVNC asks
        assert ws.subprotocol == "binary"
        _greeted(ws)


def test_a_token_works_only_for_its_vm_and_only_until_it_expires(
    api: Api, node: Running, env: dict[str, Any], opens: Opens
) -> None:
    mine, other = _vm(api, env, "mine"), _vm(api, env, "other")
    token = api.call("RequestConsoleAccess", vmInstanceUuid=mine["uuid"])["inventory"]["token"]
    code, reason = _refusal(_socket_url(node, other["uuid"], token))
    assert code == 1008 and "another VM" in reason
    for url in (_socket_url(node, mine["uuid"], "x" + token), f"ws://127.0.0.1:{node.port}/console/ws",
                _socket_url(node, mine["uuid"], "")):
        code, reason = _refusal(url)
        assert code == 1008 and "unknown" in reason
    assert opens.vms == []
    # trying it on another VM did not spend it
    with connect(_socket_url(node, mine["uuid"], token), open_timeout=10) as ws:
        _greeted(ws)

    api.call("UpdateGlobalConfig", category="console", name="token.timeout", value="1")
    late = api.call("RequestConsoleAccess", vmInstanceUuid=mine["uuid"])["inventory"]
    time.sleep(1.5)
    code, reason = _refusal(late["webSocketUrl"])
    assert code == 1008 and "expired" in reason
    assert opens.vms == [mine["uuid"]]
    assert api.fails("UpdateGlobalConfig", category="console", name="token.timeout", value="0")["code"] == "SYS.1007"


def test_a_spice_vm_is_told_that_the_browser_console_needs_vnc(api: Api, env: dict[str, Any]) -> None:
    vnc_vm = _vm(api, env, "vnc")
    api.call("UpdateGlobalConfig", category="kvm", name="vm.consoleMode", value="spice")
    try:
        spice_vm = _vm(api, env, "spice")
    finally:
        api.call("UpdateGlobalConfig", category="kvm", name="vm.consoleMode", value="vnc")
    err = api.fails("RequestConsoleAccess", vmInstanceUuid=spice_vm["uuid"])
    assert err["code"] == "CONSOLE.1001" and "kvm vm.consoleMode=vnc" in err["details"]
    assert "spice" in err["details"]
    # what counts is the console the VM runs with: the one started before the change still has VNC
    api.call("RequestConsoleAccess", vmInstanceUuid=vnc_vm["uuid"])


def test_only_a_running_vm_of_ones_own_has_a_console(api: Api, node: Running, env: dict[str, Any]) -> None:
    vm = _vm(api, env)
    token = api.call("RequestConsoleAccess", vmInstanceUuid=vm["uuid"])["inventory"]["token"]
    api.call("StopVmInstance", uuid=vm["uuid"])
    assert api.fails("RequestConsoleAccess", vmInstanceUuid=vm["uuid"])["code"] == "SYS.1005"
    # a token granted while it ran opens nothing now
    code, reason = _refusal(_socket_url(node, vm["uuid"], token))
    assert code == 1011 and "Stopped" in reason
    api.call("StartVmInstance", uuid=vm["uuid"])
    api.call("CreateAccount", name="eve", password=hashlib.sha512(b"eve").hexdigest())
    eve = Api(node.url)
    eve.login("eve", "eve")
    assert eve.fails("RequestConsoleAccess", vmInstanceUuid=vm["uuid"])["code"] == "SYS.1006"
    assert eve.fails("QueryConsoleProxyAgent", conditions=[])["code"] == "ID.1003"
    assert eve.fails("ReconnectConsoleProxyAgent")["code"] == "ID.1003"


def test_the_agent_opens_a_vnc_tunnel_for_the_management_node_only(
    api: Api, node: Running, env: dict[str, Any], opens: Opens, tmp_path: Path
) -> None:
    vm = _vm(api, env)
    host = env["hosts"][0]["uuid"]
    url = f"https://127.0.0.1:{node.agent_port}/vm/vnc?hostUuid={host}&vmUuid={vm['uuid']}"
    trust = (node.data_dir / "pki" / "ca.crt").read_text()
    bundle = tmp_path / "agent.pem"
    pki.write_private(bundle, pki.Authority(node.data_dir / "pki").issue(pki.AGENT, "127.0.0.1:9", ["127.0.0.1"]))
    as_agent = ssl.create_default_context(cadata=trust)
    as_agent.load_cert_chain(str(bundle))
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    refused = httpx.get(url, verify=as_agent, headers=upgrade)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "AGENT_FORBIDDEN"
    # no certificate: 401, and no tunnel
    bare = httpx.get(url, verify=ssl.create_default_context(cadata=trust), headers=upgrade)
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "AGENT_UNAUTHENTICATED"
    assert opens.vms == []


def test_the_console_proxy_agent_is_the_management_node(api: Api, node: Running) -> None:
    (agent,) = api.query("QueryConsoleProxyAgent")
    assert _no_nulls(agent)
    assert agent["managementIp"] == "127.0.0.1" and agent["type"] == "ManagementServerConsoleProxy"
    assert (agent["status"], agent["state"]) == ("Connected", "Enabled")
    assert re.fullmatch(r"[0-9a-f]{32}", agent["uuid"]) and f":{node.port}" in agent["description"]
    assert api.query("QueryConsoleProxyAgent", ("status", "=", "Disconnected")) == []

    # a re-check finds it serving; an unknown agent is an error, not an empty success
    (checked,) = api.call("ReconnectConsoleProxyAgent")["inventories"]
    assert checked["uuid"] == agent["uuid"] and checked["status"] == "Connected"
    (checked,) = api.call("ReconnectConsoleProxyAgent", agentUuids=[agent["uuid"]])["inventories"]
    assert checked["status"] == "Connected"
    assert api.fails("ReconnectConsoleProxyAgent", agentUuids=["0" * 32])["code"] == "SYS.1006"


def test_the_console_page_runs_no_inline_script_and_ships_novnc(api: Api, node: Running) -> None:
    page = httpx.get(f"{node.url}/console/?vmInstanceUuid=x&token=y")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy and "script-src 'self'" in policy
    assert page.headers["referrer-policy"] == "no-referrer"
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page.text, re.S)
    assert scripts and all('src="' in attrs and not body.strip() for attrs, body in scripts)
    assert "style=" not in page.text and "<style" not in page.text
    script = httpx.get(f"{node.url}/console/static/console.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert 'from "./novnc/core/rfb.js"' in script.text
    rfb = httpx.get(f"{node.url}/console/static/novnc/core/rfb.js")
    assert rfb.status_code == 200 and "export default class RFB" in rfb.text
    # where the vendored files came from
    readme = Path(__file__).resolve().parents[2] / "src/nimbostack/web/static/novnc/README.md"
    assert re.search(r"@novnc/novnc.*\*\*\d+\.\d+\.\d+\*\*", readme.read_text())
    assert httpx.get(f"{node.url}/console/static/../../api/app.py").status_code == 404
