"""The SSH deployment's failures, against a real sshd on 127.0.0.1 (no VM): a wrong password, and a
"host" that is not Debian 12 (sshd's ForceCommand answers as an Ubuntu machine would). Each names
its task and its output, logs every task before and after it, keeps no password anywhere, and
leaves the host not added: no row, no tags, no capacity."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pytest

from nimbostack.core import spec
from tests.conftest import Api, Running, free_port

SSHD = Path("/usr/sbin/sshd")
if not SSHD.exists():
    pytest.skip("sshd is missing: .ci/run installs scripts/ssh-packages.txt", allow_module_level=True)

# what the fake host answers to anything: an Ubuntu os-release, after a pause longer than a poll of
# the job waits (api/app.py RESULT_WAIT), so that the client sees the task in the job's progress
FAKE_HOST = """#!/bin/sh
case "$SSH_ORIGINAL_COMMAND" in
  *os-release*) sleep 4; printf 'PRETTY_NAME="Ubuntu 22.04.4 LTS"\\nID=ubuntu\\nVERSION_ID="22.04"\\n' ;;
  *) echo "unexpected: $SSH_ORIGINAL_COMMAND" >&2; exit 1 ;;
esac
"""


class Sshd:
    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "host_key")], check=True)
        self.key = asyncssh.generate_private_key("ssh-ed25519")
        (root / "authorized_keys").write_bytes(self.key.export_public_key())
        fake = root / "fake-host.sh"
        fake.write_text(FAKE_HOST)
        fake.chmod(0o755)
        (root / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1\nPort {self.port}\nHostKey {root / 'host_key'}\nPidFile {root / 'pid'}\n"
            f"PermitRootLogin yes\nPasswordAuthentication yes\nKbdInteractiveAuthentication no\nUsePAM no\n"
            f"StrictModes no\nAuthorizedKeysFile {root / 'authorized_keys'}\nForceCommand {fake}\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(root / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=(root / "log").open("wb"))
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not start: {(root / 'log').read_text()}") from None
                time.sleep(0.1)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    d = Sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def kvm(api: Api) -> str:
    zone = api.call("CreateZone", name="z")["inventory"]["uuid"]
    return str(api.call("CreateCluster", name="kvm", zoneUuid=zone, hypervisorType="KVM")["inventory"]["uuid"])


def _left_of(api: Api, uuid: str) -> dict[str, Any]:
    return {
        "hosts": api.query("QueryHost", ("uuid", "=", uuid)),
        "userTags": api.query("QueryUserTag", ("resourceUuid", "=", uuid)),
        "capacity": api.call("GetCpuMemoryCapacity", all=True)["totalMemory"],
    }


def _deploy_log(node: Running) -> str:
    path = node.data_dir / "logs" / "deploy" / "127.0.0.1.log"
    return path.read_text() if path.exists() else ""


def test_a_wrong_password_fails_at_the_ssh_task_and_adds_nothing(api: Api, node: Running, kvm: str,
                                                                 sshd: Sshd) -> None:
    uuid = "0d" * 16
    secret = "not-the-root-password-4711"
    err = api.fails("AddKVMHost", name="wrong", managementIp="127.0.0.1", username="root", password=secret,
                    port=sshd.port, clusterUuid=kvm, resourceUuid=uuid, userTags=["mine"])
    assert err["code"] == "HOST.1003"
    assert "task 'connect over SSH'" in err["description"]
    assert "permission denied" in err["details"] and "deploy log" in err["details"]
    assert _left_of(api, uuid) == {"hosts": [], "userTags": [], "capacity": 0}
    text = _deploy_log(node)
    assert "task 1/9 connect over SSH: start" in text and "task 1/9 connect over SSH: FAILED" in text
    assert "task 2/9" not in text
    # the password is kept nowhere: not in the deploy log, the node's database or its files
    for f in node.data_dir.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


def test_a_host_that_is_not_debian_12_fails_at_the_os_check_and_is_rolled_back(
        api: Api, node: Running, kvm: str, sshd: Sshd) -> None:
    uuid = "0e" * 16
    before = api.call("GetCpuMemoryCapacity", all=True)
    http = httpx.Client(timeout=30)
    body = {"name": "ubuntu", "managementIp": "127.0.0.1", "username": "root", "sshPort": sshd.port,
            "sshPrivateKey": sshd.key.export_private_key().decode(), "clusterUuid": kvm, "resourceUuid": uuid,
            "userTags": ["mine"], "session": {"uuid": api.session}}
    answer = http.post(f"{api.base}/zstack/api", json={spec.messages()["AddKVMHost"].full_name: body}).json()
    progress, rows = [], []
    while answer["state"] == "Processing":
        progress.append(answer.get("progress"))
        rows.append(len(api.query("QueryHost", ("uuid", "=", uuid))))
        answer = http.get(f"{api.base}/zstack/api/result/{answer['uuid']}").json()
    (reply,) = json.loads(answer["result"]).values()
    # while it ran, the host was there (Connecting) and its job said which task it was at
    assert "task 2/9 check the OS: start" in progress, progress
    assert 1 in rows
    err = reply["error"]
    assert not reply["success"] and err["code"] == "HOST.1003"
    assert "task 'check the OS'" in err["description"]
    assert "Ubuntu 22.04.4 LTS" in err["details"] and "Debian 12" in err["details"]
    assert _left_of(api, uuid) == {"hosts": [], "userTags": [], "capacity": before["totalMemory"]}
    run = _deploy_log(node).split("--- deploying")[-1]
    assert "task 1/9 connect over SSH: done" in run and "host key SHA256:" in run
    assert "task 2/9 check the OS: start" in run and "task 2/9 check the OS: FAILED" in run
    assert "task 3/9" not in run


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"username": "root"}, "password"),
        ({"username": "root", "sshPrivateKey": "not a key"}, "sshPrivateKey"),
        ({"username": "root", "password": "x", "port": 70000}, "port"),
    ],
)
def test_bad_login_fields_are_refused_before_anything_is_made(api: Api, kvm: str, params: dict[str, Any],
                                                               says: str) -> None:
    err = api.fails("AddKVMHost", name="bad", managementIp="127.0.0.9", clusterUuid=kvm, **params)
    assert err["code"] == "SYS.1007" and says in err["details"], err
    assert api.query("QueryHost", ("name", "=", "bad")) == []
