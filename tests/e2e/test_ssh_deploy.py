"""AddKVMHost deploys the agent over SSH to a host that has none (ZStack's deployer): a test machine
(tests/e2e/machine.py, SshMachine) with a real sshd, a libvirtd not listening on TCP, no agent and no
systemd as PID 1. Then a tiny guest runs on it; ReconnectHost of the up-to-date host does not
redeploy, and one whose agent died is redeployed with the node's own key (the password is gone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Api, Running, wait_for

sys.path.insert(0, os.path.dirname(__file__))
from image_fixtures import tiny_image_dir  # noqa: E402, F401  (pytest fixture)
from machine import SshMachine, Wire  # noqa: E402

pytestmark = pytest.mark.e2e

pytest.importorskip("libvirt", reason="libvirt-python is not installed: .ci/run installs it")
for _tool in ("unshare", "nsenter", "libvirtd", "virtlogd", "/usr/sbin/sshd"):
    if subprocess.run(["which", _tool], capture_output=True).returncode != 0:
        pytest.skip(f"{_tool} is missing: .ci/run installs util-linux and scripts/*-packages.txt",
                    allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("making network and mount namespaces needs root (CI runs as root)", allow_module_level=True)


class Site:
    def __init__(self, root: Path) -> None:
        self.wire = Wire("198.18.201.1")
        self.machine: SshMachine | None = None
        self.node: Running | None = None
        try:
            self.machine = SshMachine(root / "m", self.wire, "198.18.201.2", root / "data")
            self.node = Running(root / "data", driver="libvirt", listen=self.wire.ip)
        except BaseException:
            self.close()
            raise
        self.api = Api(self.node.url)
        self.api.login()
        self.root = root

    @property
    def deploy_log(self) -> str:
        assert self.node is not None and self.machine is not None
        path = self.node.data_dir / "logs" / "deploy" / f"{self.machine.ip}.log"
        return path.read_text() if path.exists() else ""

    def close(self) -> None:
        if self.machine is not None:
            self.machine.close()
        if self.node is not None:
            self.node.stop()
        self.wire.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = Site(tmp_path_factory.mktemp("deploy"))
    try:
        yield s
    finally:
        s.close()


def _add_watching_progress(site: Site, **params: object) -> tuple[dict[str, object], list[str]]:
    """AddKVMHost by hand, polling its job: the reply and every progress line seen while it ran."""
    from nimbostack.core import spec

    http = httpx.Client(timeout=30)
    body = {**params, "session": {"uuid": site.api.session}}
    answer = http.post(f"{site.api.base}/zstack/api", json={spec.messages()["AddKVMHost"].full_name: body}).json()
    seen: list[str] = []
    while answer["state"] == "Processing":
        if answer.get("progress") and answer["progress"] not in seen:
            seen.append(answer["progress"])
        time.sleep(0.05)
        answer = http.get(f"{site.api.base}/zstack/api/result/{answer['uuid']}").json()
    (reply,) = json.loads(answer["result"]).values()
    return reply, seen


def test_a_fresh_host_is_deployed_over_ssh_and_runs_a_guest(site: Site, request: pytest.FixtureRequest) -> None:
    images: Path = request.getfixturevalue("tiny_image_dir")
    a, mach = site.api, site.machine
    assert mach is not None and mach.agent_pid() is None
    zone = a.call("CreateZone", name="z")["inventory"]["uuid"]
    cluster = a.call("CreateCluster", name="c", zoneUuid=zone, hypervisorType="KVM")["inventory"]["uuid"]

    # this machine's own libvirtd (its pid file is in the /run the test machine shares) must survive
    # the deployment's restart of the host's libvirtd
    own = Path("/run/libvirtd.pid").read_text().strip() if Path("/run/libvirtd.pid").exists() else ""
    started = time.monotonic()
    reply, progress = _add_watching_progress(site, name="fresh", managementIp=mach.ip, username="root",
                                             password=SshMachine.PASSWORD, clusterUuid=cluster)
    took = time.monotonic() - started
    assert reply["success"], reply
    host = reply["inventory"]
    assert host["status"] == "Connected" and host["totalMemoryCapacity"] > 0
    # the operator watched it happen (a poll waits a while for the job: it sees some of the lines)
    assert any(p.startswith("task ") for p in progress), progress
    text = site.deploy_log
    for n, task in enumerate(["connect over SSH", "check the OS", "install packages", "install the agent",
                              "configure libvirtd", "authorise the node's SSH key",
                              "hand over the agent's credentials", "start the agent",
                              "wait for the agent's first ping"], 1):
        assert f"task {n}/9 {task}: start" in text and f"task {n}/9 {task}: done" in text, text
    assert "systemd is not PID 1" in text and "all 9 packages are installed" in text
    assert SshMachine.PASSWORD not in text
    print(f"\nfresh deploy {took:.1f} s")

    # what it left on the host: the agent (a daemon), its bundle 0600, libvirtd on TCP, the node's key
    assert mach.agent_pid() is not None
    assert mach.sh("stat -c %a /var/lib/nimbostack-agent/agent.pem").strip() == "600"
    assert mach.virsh("version").returncode == 0  # qemu+tcp://IP/system, as a migration reaches it
    if own:
        assert Path(f"/proc/{own}").exists(), "the deployment stopped this machine's libvirtd"
    assert "nimbostack-node" in mach.sh("cat /root/.ssh/authorized_keys")
    assert "ExecStart=/opt/nimbostack-agent/releases/" in mach.sh(
        "cat /etc/systemd/system/nimbostack-agent.service")

    # an up-to-date host reconnects without a deployment
    deployments = text.count("--- deploying")
    started = time.monotonic()
    assert a.call("ReconnectHost", uuid=host["uuid"])["inventory"]["status"] == "Connected"
    print(f"reconnect of an up-to-date host {time.monotonic() - started:.2f} s")
    assert site.deploy_log.count("--- deploying") == deployments

    # a guest on it
    ps = a.call("AddLocalPrimaryStorage", name="ls", zoneUuid=zone, url=str(site.root / "ps"))["inventory"]["uuid"]
    a.call("AttachPrimaryStorageToCluster", primaryStorageUuid=ps, clusterUuid=cluster)
    bs = a.call("AddSftpBackupStorage", name="bs", hostname=mach.ip, username="root", password="x",
                url=str(site.root / "bs"))["inventory"]["uuid"]
    a.call("AttachBackupStorageToZone", backupStorageUuid=bs, zoneUuid=zone)
    image = a.call("AddImage", name="tiny", url=str(images / "tiny.qcow2"), format="qcow2",
                   backupStorageUuids=[bs])["inventory"]["uuid"]
    l2 = a.call("CreateL2NoVlanNetwork", name="l2", zoneUuid=zone, physicalInterface="nimbonone0",
                systemTags=["bridge::nbrdep0"])["inventory"]["uuid"]
    a.call("AttachL2NetworkToCluster", l2NetworkUuid=l2, clusterUuid=cluster)
    l3 = a.call("CreateL3Network", name="l3", l2NetworkUuid=l2)["inventory"]["uuid"]
    a.call("AddIpRange", l3NetworkUuid=l3, name="r", startIp="198.19.8.10", endIp="198.19.8.100",
           netmask="255.255.255.0", gateway="198.19.8.1")
    offering = a.call("CreateInstanceOffering", name="tiny", cpuNum=1, cpuSpeed=1,
                      memorySize=128 << 20)["inventory"]["uuid"]
    vm = a.call("CreateVmInstance", name="on-deployed", imageUuid=image, instanceOfferingUuid=offering,
                l3NetworkUuids=[l3], hostUuid=host["uuid"])["inventory"]
    assert vm["state"] == "Running" and vm["hostUuid"] == host["uuid"]
    assert mach.virsh("domstate", f"nimbo-{vm['uuid']}").stdout.strip() == "running"
    wait_for(lambda: "NIMBO-BOOT" in mach.sh(f"cat /var/lib/nimbostack-agent/console/{vm['uuid']}.log"), 120,
             "the guest on the deployed host to boot")

    # its agent dies: ReconnectHost redeploys with the node's key (the release is there already)
    mach.sh("kill $(cat /var/lib/nimbostack-agent/agent.pid)")
    wait_for(lambda: mach.sh("kill -0 $(cat /var/lib/nimbostack-agent/agent.pid) 2>&1 || echo gone").strip()
             .endswith("gone"), 10, "the agent to exit")
    started = time.monotonic()
    assert a.call("ReconnectHost", uuid=host["uuid"])["inventory"]["status"] == "Connected"
    print(f"redeploy of a host whose agent died {time.monotonic() - started:.1f} s")
    text = site.deploy_log
    assert text.count("--- deploying") == deployments + 1
    assert "is installed already" in text.split("--- deploying")[-1]
    # the guest ran on through it, and is the node's still
    assert mach.virsh("domstate", f"nimbo-{vm['uuid']}").stdout.strip() == "running"
    assert a.query("QueryVmInstance", ("uuid", "=", vm["uuid"]))[0]["state"] == "Running"
    a.call("DestroyVmInstance", uuid=vm["uuid"])
