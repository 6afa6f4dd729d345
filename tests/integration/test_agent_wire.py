"""The agent wire's side doors (issue 12 items 1–3), probed as an attacker on the network would:
without credentials, with another CA's, with a real agent's certificate asking for what only the
management node may do, and with paths that lead out of the storages."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from nimbostack.db import models as m
from nimbostack.wire import pki
from tests.conftest import Api, Running, build_zone, free_port


def _client(bundle: Path | None, trust: bytes) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=trust.decode())
    if bundle is not None:
        ctx.load_cert_chain(str(bundle))
    return ctx


def _ca(node: Running) -> bytes:
    return (node.data_dir / "pki" / "ca.crt").read_bytes()


def _issue(node: Running, tmp: Path, role: str, name: str) -> Path:
    """A bundle of the node's own CA (what a compromised host, or a stolen node key, would hold)."""
    path = tmp / f"{role}-{name.replace(':', '_')}.pem"
    pki.write_private(path, pki.Authority(node.data_dir / "pki").issue(role, name, ["127.0.0.1"]))
    return path


def _foreign(tmp: Path) -> Path:
    path = tmp / "foreign.pem"
    pki.write_private(path, pki.Authority(tmp / "other-ca").issue(pki.NODE, pki.NODE_NAME, ["127.0.0.1"]))
    return path


def _vm(api: Api, env: dict[str, Any]) -> dict[str, Any]:
    return api.call("CreateVmInstance", name="victim", imageUuid=env["image"]["uuid"],
                    instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]])["inventory"]


def _domains(node: Running, host: str) -> dict[str, str]:
    reply = node.agent_call("/simulator/state", {"hostUuid": host})
    assert reply["success"], reply
    return reply["domains"]  # type: ignore[no-any-return]


def test_an_agent_obeys_the_management_node_only(api: Api, node: Running, tmp_path: Path) -> None:
    env = build_zone(api)
    vm = _vm(api, env)
    host = vm["hostUuid"]
    agent = f"https://127.0.0.1:{node.agent_port}"
    destroy = {"hostUuid": host, "vmUuid": vm["uuid"], "uuid": vm["uuid"]}
    # no certificate: 401 and nothing else; one of another CA: no TLS session at all
    r = httpx.post(f"{agent}/vm/destroy", json=destroy, verify=_client(None, _ca(node)), timeout=5)
    assert r.status_code == 401 and r.json()["error"]["code"] == "AGENT_UNAUTHENTICATED"
    with pytest.raises(httpx.TransportError):
        httpx.post(f"{agent}/vm/destroy", json=destroy, verify=_client(_foreign(tmp_path), _ca(node)), timeout=5)
    # plain HTTP is not spoken at all
    with pytest.raises(httpx.TransportError):
        httpx.post(f"http://127.0.0.1:{node.agent_port}/vm/destroy", json=destroy, timeout=5)
    # a certificate of this CA, but an agent's: commands are the node's alone
    other_agent = _client(_issue(node, tmp_path, pki.AGENT, "127.0.0.1:9"), _ca(node))
    r = httpx.post(f"{agent}/vm/destroy", json=destroy, verify=other_agent, timeout=5)
    assert r.status_code == 403 and r.json()["error"]["code"] == "AGENT_FORBIDDEN"
    for path in ("/simulator/fault", "/host/credentials", "/bs/download"):
        assert httpx.post(f"{agent}{path}", json={"hostUuid": host}, verify=other_agent, timeout=5).status_code == 403
    assert vm["uuid"] in _domains(node, host)
    assert api.query("QueryVmInstance", ("uuid", "=", vm["uuid"]))[0]["state"] == "Running"
    # the node itself (its own certificate) is obeyed
    assert node.agent_call("/host/ping", {"hostUuid": host})["success"]


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing: .ci/run installs qemu-utils")
def test_agents_serve_files_only_below_their_storages(api: Api, node: Running, tmp_path: Path) -> None:
    root = tmp_path / "bs"
    bs = api.call("AddSftpBackupStorage", name="bs", hostname="127.0.0.1", username="root", password="x",
                  url=str(root), systemTags=[f"agentPort::{node.agent_port}"])["inventory"]
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(src), "16M"], check=True, capture_output=True)
    img = api.call("AddImage", name="img", url=str(src), format="qcow2", backupStorageUuids=[bs["uuid"]])["inventory"]
    (ref,) = img["backupStorageRefs"]
    secret = tmp_path / "secret"
    secret.write_text("not for agents")
    os.symlink(secret, root / "images" / "escape.qcow2")
    peer = _client(_issue(node, tmp_path, pki.AGENT, "127.0.0.1:9"), _ca(node))
    base = f"https://127.0.0.1:{node.agent_port}"

    def get(url: str, **params: str) -> httpx.Response:
        return httpx.get(f"{base}{url}", params=params, verify=peer, timeout=5)

    ok = get("/bs/file", path=ref["installPath"])
    assert ok.status_code == 200 and ok.content == src.read_bytes()  # what primary storages fetch
    for path in ("/etc/passwd", str(secret), f"{root}/images/../../secret", str(root / "images" / "escape.qcow2"),
                 str(root), "", "relative/path"):
        r = get("/bs/file", path=path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "IMAGE_NOT_FOUND", path
        r = get("/storage/file", hostUuid="h", path=path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "VOLUME_NOT_FOUND", path
    # the old root= parameter gives no way out
    assert get("/bs/file", root="/", path="/etc/passwd").status_code == 404
    # no certificate: no file
    r = httpx.get(f"{base}/bs/file", params={"path": ref["installPath"]}, verify=_client(None, _ca(node)), timeout=5)
    assert r.status_code == 401 and r.content != src.read_bytes()


def test_events_come_only_from_the_vms_own_host(api: Api, node: Running, tmp_path: Path) -> None:
    env = build_zone(api, hosts=2)
    vm = _vm(api, env)
    wire = f"https://127.0.0.1:{node.wire_port}/agent/events"
    forged = {"hostUuid": vm["hostUuid"], "vmUuid": vm["uuid"], "state": "Stopped"}
    # no certificate: 401; another CA's: no TLS session
    r = httpx.post(wire, json=forged, verify=_client(None, _ca(node)), timeout=5)
    assert r.status_code == 401 and r.json()["error"]["code"] == "AGENT_UNAUTHENTICATED"
    with pytest.raises(httpx.TransportError):
        httpx.post(wire, json=forged, verify=_client(_foreign(tmp_path), _ca(node)), timeout=5)
    # a certificate of this CA for another agent address, or the node's own role: refused
    for role, name in ((pki.AGENT, "127.0.0.1:9"), (pki.NODE, pki.NODE_NAME)):
        r = httpx.post(wire, json=forged, verify=_client(_issue(node, tmp_path, role, name), _ca(node)), timeout=5)
        assert r.status_code == 403 and r.json()["error"]["code"] == "AGENT_FORBIDDEN", role
    # the real agent's certificate, about a host that does not exist: refused
    real = _client(node.data_dir / "agent" / "agent.pem", _ca(node))
    r = httpx.post(wire, json={**forged, "hostUuid": "0" * 32}, verify=real, timeout=5)
    assert r.status_code == 403
    # ... and about a VM of another host it serves: the VM does not move
    other = next(h["uuid"] for h in env["hosts"] if h["uuid"] != vm["hostUuid"])
    r = httpx.post(wire, json={**forged, "hostUuid": other, "state": "Running"}, verify=real, timeout=5)
    assert r.status_code == 200
    now = api.query("QueryVmInstance", ("uuid", "=", vm["uuid"]))[0]
    assert now["state"] == "Running" and now["hostUuid"] == vm["hostUuid"]
    # a malformed event is refused in the wire's shape
    r = httpx.post(wire, content=b"not json", verify=real, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["code"] == "AGENT_BAD_EVENT"
    # the VM's own host says it stopped: taken
    r = httpx.post(wire, json=forged, verify=real, timeout=5)
    assert r.status_code == 200
    assert api.query("QueryVmInstance", ("uuid", "=", vm["uuid"]))[0]["state"] == "Stopped"


def test_reconnect_host_rotates_the_agents_credentials(api: Api, node: Running) -> None:
    env = build_zone(api)
    host = env["hosts"][0]["uuid"]
    bundle = node.data_dir / "agent" / "agent.pem"
    before = pki.Credentials(bundle)
    api.call("ReconnectHost", uuid=host)
    after = pki.Credentials(bundle)
    assert after.cert.serial_number != before.cert.serial_number and after.peer == before.peer
    assert oct(bundle.stat().st_mode & 0o777) == "0o600"
    # the new certificate is the one served now, and the wire works on
    ctx = ssl.create_default_context(cadata=_ca(node).decode())
    ctx.load_cert_chain(str(_issue(node, bundle.parent.parent, pki.NODE, pki.NODE_NAME)))
    import socket

    with socket.create_connection(("127.0.0.1", node.agent_port)) as raw, ctx.wrap_socket(
        raw, server_hostname="127.0.0.1"
    ) as tls:
        served = tls.getpeercert(binary_form=True)
    from cryptography import x509

    assert served is not None and x509.load_der_x509_certificate(served).serial_number == after.cert.serial_number
    _vm(api, env)  # commands still reach the agent
    # a bundle of another CA, or for another agent, is refused by the agent
    refused = node.agent_call("/host/credentials", {"hostUuid": host, "bundle": pki.Authority(
        bundle.parent / "rogue-ca").issue(pki.AGENT, after.peer.name, ["127.0.0.1"]).decode()})
    assert not refused["success"] and refused["error"]["code"] == "AGENT_BAD_CREDENTIALS"
    assert pki.Credentials(bundle).cert.serial_number == after.cert.serial_number


def test_a_host_whose_agent_this_node_did_not_certify_is_not_added(api: Api, node: Running, tmp_path: Path) -> None:
    from nimbostack.main import agent_app

    env = build_zone(api)
    kvm = api.call("CreateCluster", name="kvm", zoneUuid=env["zone"]["uuid"], hypervisorType="KVM")["inventory"]
    port = free_port()
    stranger = pki.agent_bundle(pki.Authority(tmp_path / "other-ca"), tmp_path / "stranger.pem",
                                f"127.0.0.1:{port}", ["127.0.0.1"])
    server = agent_app("simulator", "auto", "127.0.0.1", str(tmp_path / "stranger"), stranger)
    node.run(server.start("127.0.0.1", port))
    try:
        err = api.fails("AddKVMHost", name="stranger", managementIp="127.0.0.1", username="root", password="x",
                        clusterUuid=kvm["uuid"], systemTags=[f"agentPort::{port}"])
        assert err["code"] == "HOST.1002" and "agent-credentials" in err["details"]
        assert all(h["name"] != "stranger" for h in api.query("QueryHost"))
    finally:
        node.run(server.stop())
    # an agent this node certified (a simulated one, as a KVM host here) is added, and the host's
    # root password is not kept anywhere in the database
    port = free_port()
    known = pki.agent_bundle(pki.Authority(node.data_dir / "pki"), tmp_path / "known.pem", f"127.0.0.1:{port}",
                             ["127.0.0.1"])
    server = agent_app("simulator", "auto", "127.0.0.1", str(tmp_path / "known"), known)
    node.run(server.start("127.0.0.1", port))
    try:
        host = api.call("AddKVMHost", name="known", managementIp="127.0.0.1", username="root",
                        password="s3cret-pw", clusterUuid=kvm["uuid"], systemTags=[f"agentPort::{port}"])["inventory"]
        assert host["status"] == "Connected"
    finally:
        node.run(server.stop())

    async def stored() -> Any:
        async with node.platform.db.tx() as s:
            return (await s.execute(select(m.Host.password).where(m.Host.uuid == host["uuid"]))).scalar()

    assert node.run(stored()) is None
