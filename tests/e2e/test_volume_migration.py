"""Two real KVM hosts on this machine: volume snapshots, LocalStorageMigrateVolume (1.0 §3) and
SharedMountPoint primary storage (1.2) with real files, qemu-img and real guests.

Host 1 is the agent of ``Running`` (in this process); host 2 is a second libvirt agent, a
subprocess (``nimbostack agent --driver libvirt --port P``) that can be killed mid-copy. Both are
added with managementIp 127.0.0.1 and ``agentPort::P``; both use this machine's libvirtd, and
each reports only the domains started for it (domain metadata). The LocalStorage url is one path
for every host, as in real life; host 2 keeps its share elsewhere with ``--path-map URL=DIR``
(what a bind mount would do), so the two shares are two directories here. The SharedMountPoint
directory is not mapped: both hosts see the same files, as with NFS.

Live migration (MigrateVm) needs two libvirtds: here both "hosts" share one, so its refusal is
tested; the move itself runs between two machines of their own in test_two_machines.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Api, ApiError, Running, free_port, wait_for

sys.path.insert(0, os.path.dirname(__file__))
from image_fixtures import tiny_image_dir  # noqa: E402, F401  (pytest fixture)

pytestmark = pytest.mark.e2e

pytest.importorskip("libvirt", reason="libvirt-python is not installed: .ci/run installs it")
if subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode != 0:
    pytest.skip("libvirtd not running: run scripts/start-libvirtd", allow_module_level=True)

NIMBOSTACK = Path(sys.executable).with_name("nimbostack")
BANDWIDTH = 40 << 20  # host 2 copies at most 40 MiB/s: a 240 MiB volume takes ~6 s, time to kill it


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True)


def qemu_io(path: Path, command: str) -> str:
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)], capture_output=True, text=True)
    assert out.returncode == 0 and "Pattern verification failed" not in out.stdout + out.stderr, out
    return out.stdout


def chain(path: Path) -> list[str]:
    """The backing chain of a qcow2 file: itself, its backing file, ..."""
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return re.findall(r"^image: (.*)$", out.stdout, re.M)


class SecondAgent:
    """Host 2's agent as a subprocess, so a test can kill it."""

    def __init__(self, root: Path, path_map: list[str]) -> None:
        self.port = free_port()
        self.state = root / "agent2"
        # its credentials from the node's CA (root/data/pki), as an operator issues them (README)
        subprocess.run([str(NIMBOSTACK), "agent-credentials", "--data-dir", str(root / "data"), "--address",
                        f"127.0.0.1:{self.port}", "--out", str(self.state / "agent.pem")], check=True)
        self.path_map = path_map
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        args = [str(NIMBOSTACK), "agent", "--driver", "libvirt", "--port", str(self.port), "--listen", "127.0.0.1",
                "--state-dir", str(self.state), "--migrate-bandwidth", str(BANDWIDTH)]
        for item in self.path_map:
            args += ["--path-map", item]
        log = (self.state.parent / "agent2.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        import socket

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(up, 30, "the second agent to listen")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class TwoHosts:
    def __init__(self, root: Path, images: Path, storage: str) -> None:
        self.root = root
        self.ps_url = root / ("ps" if storage == "local" else "smp")
        self.host2_dir = root / "host2-ps"  # host 2's share of the local storage (same url)
        self.ps_url.mkdir(parents=True, exist_ok=True)
        self.node = Running(root / "data", driver="libvirt", agent_port=free_port())
        self.agent2 = SecondAgent(root, [f"{self.ps_url}={self.host2_dir}"] if storage == "local" else [])
        self.api = a = Api(self.node.url)
        a.login()
        self.bridge = f"nbm{uuid.uuid4().hex[:8]}"
        zone = a.call("CreateZone", name="two")["inventory"]["uuid"]
        cluster = a.call("CreateCluster", name="kvm", zoneUuid=zone, hypervisorType="KVM")["inventory"]["uuid"]
        if storage == "local":
            ps = a.call("AddLocalPrimaryStorage", name="ls", zoneUuid=zone, url=str(self.ps_url))["inventory"]
        else:
            ps = a.call("AddSharedMountPointPrimaryStorage", name="smp", zoneUuid=zone,
                        url=str(self.ps_url))["inventory"]
        self.ps = ps["uuid"]
        a.call("AttachPrimaryStorageToCluster", primaryStorageUuid=self.ps, clusterUuid=cluster)
        self.h1, self.h2 = (
            a.call("AddKVMHost", name=f"host{i}", managementIp="127.0.0.1", username="root", password="x",
                   clusterUuid=cluster, systemTags=[f"agentPort::{port}"])["inventory"]["uuid"]
            for i, port in ((1, self.node.agent_port), (2, self.agent2.port))
        )
        bs = a.call("AddSftpBackupStorage", name="bs", hostname="127.0.0.1", username="root", password="x",
                    url=str(root / "bs"), systemTags=[f"agentPort::{self.node.agent_port}"])["inventory"]["uuid"]
        a.call("AttachBackupStorageToZone", backupStorageUuid=bs, zoneUuid=zone)
        self.image = a.call("AddImage", name="tiny", url=str(images / "tiny.qcow2"), format="qcow2",
                            backupStorageUuids=[bs])["inventory"]["uuid"]
        l2 = a.call("CreateL2NoVlanNetwork", name="l2", zoneUuid=zone, physicalInterface="nimbonone0",
                    systemTags=[f"bridge::{self.bridge}"])["inventory"]["uuid"]
        a.call("AttachL2NetworkToCluster", l2NetworkUuid=l2, clusterUuid=cluster)
        self.l3 = a.call("CreateL3Network", name="l3", l2NetworkUuid=l2)["inventory"]["uuid"]
        a.call("AddIpRange", l3NetworkUuid=self.l3, name="r", startIp="198.19.9.10", endIp="198.19.9.200",
               netmask="255.255.255.0", gateway="198.19.9.1")
        self.offering = a.call("CreateInstanceOffering", name="tiny", cpuNum=1, cpuSpeed=1,
                               memorySize=128 << 20)["inventory"]["uuid"]
        self.disk = a.call("CreateDiskOffering", name="d", diskSize=256 << 20)["inventory"]["uuid"]

    # --- helpers
    def create(self, name: str, **extra: Any) -> dict[str, Any]:
        return self.api.call("CreateVmInstance", name=name, imageUuid=self.image, instanceOfferingUuid=self.offering,
                             l3NetworkUuids=[self.l3], **extra)["inventory"]

    def console(self, host: str, vm_uuid: str) -> str:
        folder = self.root / "data" / "agent" if host == self.h1 else self.agent2.state
        path = folder / "console" / f"{vm_uuid}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_boot(self, host: str, vm_uuid: str, timeout: float = 90) -> None:
        wait_for(lambda: "NIMBO-BOOT" in self.console(host, vm_uuid), timeout, f"{vm_uuid} to boot on {host}")

    def on_host(self, host: str, path: str) -> Path:
        """Where a file of the local storage is on this machine for ``host``."""
        if host == self.h2 and path.startswith(str(self.ps_url)):
            return Path(str(self.host2_dir) + path[len(str(self.ps_url)):])
        return Path(path)

    def volume(self, uuid: str) -> dict[str, Any]:
        return self.api.query("QueryVolume", ("uuid", "=", uuid))[0]

    def placed(self, uuid: str) -> str:
        return self.api.query("QueryLocalStorageResourceRef", ("resourceUuid", "=", uuid))[0]["hostUuid"]

    def shares(self) -> dict[str, int]:
        reply = self.api.call("GetLocalStorageHostDiskCapacity", primaryStorageUuid=self.ps)
        return {r["hostUuid"]: r["availableCapacity"] for r in reply["inventories"]}

    def close(self) -> None:
        for vm in self.api.query("QueryVmInstance"):
            virsh("destroy", f"nimbo-{vm['uuid']}")
            virsh("undefine", f"nimbo-{vm['uuid']}")
        self.agent2.stop()
        self.node.stop()
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[TwoHosts]:
    images = request.getfixturevalue("tiny_image_dir")
    env = TwoHosts(tmp_path_factory.mktemp("twohosts"), images, "local")
    try:
        yield env
    finally:
        env.close()


def test_two_agents_on_one_machine_are_two_hosts(two: TwoHosts) -> None:
    hosts = {h["uuid"]: h for h in two.api.query("QueryHost")}
    assert hosts[two.h1]["status"] == hosts[two.h2]["status"] == "Connected"
    assert hosts[two.h1]["managementIp"] == hosts[two.h2]["managementIp"] == "127.0.0.1"
    # without agentPort a second host on one managementIp is refused
    err = two.api.fails("AddKVMHost", name="dup", managementIp="127.0.0.1", username="root", password="x",
                        clusterUuid=hosts[two.h1]["clusterUuid"])
    assert "already exists" in err["details"]
    # nor with the agent port a host uses already
    err = two.api.fails("AddKVMHost", name="dup", managementIp="127.0.0.1", username="root", password="x",
                        clusterUuid=hosts[two.h1]["clusterUuid"], systemTags=[f"agentPort::{two.agent2.port}"])
    assert "already exists" in err["details"]
    assert set(two.shares()) == {two.h1, two.h2}


def test_root_volume_with_a_live_snapshot_moves_and_boots_on_host2(two: TwoHosts) -> None:
    a = two.api
    vm = two.create("mover", hostUuid=two.h1)
    u, root = vm["uuid"], vm["allVolumes"][0]
    two.wait_boot(two.h1, u)
    # a snapshot of the running VM: QEMU continues in a new file backed by the old one
    snap = a.call("CreateVolumeSnapshot", volumeUuid=root["uuid"], name="running")["inventory"]
    top = two.volume(root["uuid"])["installPath"]
    assert snap["primaryStorageInstallPath"] == root["installPath"] and top != root["installPath"]
    assert chain(Path(top))[:2] == [top, root["installPath"]]
    assert top in virsh("domblklist", f"nimbo-{u}").stdout
    err = a.fails("LocalStorageMigrateVolume", volumeUuid=root["uuid"], destHostUuid=two.h2)
    assert "stop the VM first" in err["details"]

    a.call("StopVmInstance", uuid=u)
    before = two.shares()
    moved = a.call("LocalStorageMigrateVolume", volumeUuid=root["uuid"], destHostUuid=two.h2)["inventory"]
    assert moved["installPath"] == top and moved["status"] == "Ready"
    assert two.placed(root["uuid"]) == two.h2 and two.placed(snap["uuid"]) == two.h2
    # the files left host 1; on host 2 they form the same chain over host 2's image cache
    for path in (top, snap["primaryStorageInstallPath"]):
        assert not Path(path).exists() and two.on_host(two.h2, path).exists()
    files = chain(two.on_host(two.h2, top))
    assert files[:2] == [str(two.on_host(two.h2, top)), str(two.on_host(two.h2, snap["primaryStorageInstallPath"]))]
    assert files[2].startswith(str(two.host2_dir / "imagecache"))
    assert not list(two.host2_dir.rglob("*.part"))
    after = two.shares()
    held = root["size"] + snap["size"]
    assert after[two.h1] == before[two.h1] + held and after[two.h2] == before[two.h2] - held

    started = a.call("StartVmInstance", uuid=u)["inventory"]
    assert started["state"] == "Running" and started["hostUuid"] == two.h2
    assert virsh("domstate", f"nimbo-{u}").stdout.strip() == "running"
    two.wait_boot(two.h2, u)
    assert str(two.on_host(two.h2, top)) in virsh("domblklist", f"nimbo-{u}").stdout
    # host 1 does not claim the VM (one libvirtd, two agents)
    time.sleep(1)
    assert a.query("QueryVmInstance", ("uuid", "=", u))[0]["hostUuid"] == two.h2
    a.call("DestroyVmInstance", uuid=u)


def test_data_volume_with_a_snapshot_keeps_its_data(two: TwoHosts) -> None:
    a = two.api
    vm = two.create("data", hostUuid=two.h1, dataDiskOfferingUuids=[two.disk])
    data = next(v for v in vm["allVolumes"] if v["type"] == "Data")
    a.call("StopVmInstance", uuid=vm["uuid"])
    a.call("DetachDataVolumeFromVm", uuid=data["uuid"])
    qemu_io(Path(data["installPath"]), "write -P 0x41 0 1M")
    snap = a.call("CreateVolumeSnapshot", volumeUuid=data["uuid"], name="A")["inventory"]
    top = two.volume(data["uuid"])["installPath"]
    qemu_io(Path(top), "write -P 0x42 1M 1M")

    # attached volumes and running VMs' root volumes stay; this one is detached
    a.call("LocalStorageMigrateVolume", volumeUuid=data["uuid"], destHostUuid=two.h2)
    here = two.on_host(two.h2, top)
    assert not Path(top).exists() and not Path(snap["primaryStorageInstallPath"]).exists()
    qemu_io(here, "read -P 0x41 0 1M")
    qemu_io(here, "read -P 0x42 1M 1M")
    qemu_io(two.on_host(two.h2, snap["primaryStorageInstallPath"]), "read -P 0 1M 1M")
    # the VM is on host 1: the volume cannot join it there
    err = a.fails("AttachDataVolumeToVm", vmInstanceUuid=vm["uuid"], volumeUuid=data["uuid"])
    assert "LocalStorageMigrateVolume" in err["details"]
    # the snapshot still reverts, on host 2
    a.call("RevertVolumeFromSnapshot", uuid=snap["uuid"])
    reverted = two.on_host(two.h2, two.volume(data["uuid"])["installPath"])
    qemu_io(reverted, "read -P 0x41 0 1M")
    qemu_io(reverted, "read -P 0 1M 1M")
    assert not here.exists()
    # back to host 1 with the VM's root volume: it attaches again
    a.call("LocalStorageMigrateVolume", volumeUuid=data["uuid"], destHostUuid=two.h1)
    a.call("AttachDataVolumeToVm", vmInstanceUuid=vm["uuid"], volumeUuid=data["uuid"])
    a.call("DestroyVmInstance", uuid=vm["uuid"])


def test_killing_the_destination_agent_mid_copy_loses_nothing(two: TwoHosts) -> None:
    a = two.api
    vm = two.create("big", hostUuid=two.h1, dataDiskOfferingUuids=[two.disk])
    data = next(v for v in vm["allVolumes"] if v["type"] == "Data")
    a.call("StopVmInstance", uuid=vm["uuid"])
    a.call("DetachDataVolumeFromVm", uuid=data["uuid"])
    source = Path(data["installPath"])
    qemu_io(source, "write -P 0x5a 0 240M")
    before = two.shares()
    dest = two.on_host(two.h2, data["installPath"])

    failure: list[BaseException] = []

    def migrate() -> None:
        try:
            a2 = Api(two.node.url)
            a2.session = a.session
            a2.call("LocalStorageMigrateVolume", volumeUuid=data["uuid"], destHostUuid=two.h2)
        except BaseException as err:  # noqa: BLE001  (kept for the assertion below)
            failure.append(err)

    t = threading.Thread(target=migrate)
    t.start()
    part = Path(str(dest) + ".part")
    wait_for(lambda: part.exists() and part.stat().st_size > 32 << 20, 30, "the copy to be under way")
    two.agent2.kill()
    t.join(60)
    assert failure and isinstance(failure[0], ApiError)

    # the original is whole and still the volume; nothing is charged to host 2
    assert two.placed(data["uuid"]) == two.h1 and two.volume(data["uuid"])["status"] == "Ready"
    qemu_io(source, "read -P 0x5a 0 240M")
    assert two.shares() == before
    assert part.exists() and not dest.exists()  # a killed agent leaves its .part behind ...
    gc = two.node.run(_pending(two, two.h2))
    assert data["installPath"] in {e["body"]["installPath"] for e in gc}

    # ... which goes when it is back
    two.agent2.start()
    a.call("ReconnectHost", uuid=two.h2)
    assert not part.exists() and not dest.exists()
    assert not list(two.host2_dir.rglob("*.part"))
    assert two.node.run(_pending(two, two.h2)) == []
    assert two.shares() == before

    # and the migration works the second time
    a.call("LocalStorageMigrateVolume", volumeUuid=data["uuid"], destHostUuid=two.h2)
    assert two.placed(data["uuid"]) == two.h2 and not source.exists()
    qemu_io(dest, "read -P 0x5a 0 240M")
    a.call("DestroyVmInstance", uuid=vm["uuid"])


async def _pending_entries(p: Any, host: str) -> list[dict[str, Any]]:
    from nimbostack.core import gc

    return await gc.entries(p, status="Pending", host_uuid=host)


def _pending(two: TwoHosts, host: str) -> Any:
    return _pending_entries(two.node.platform, host)


def test_shared_mount_point_vm_moves_between_hosts_without_a_copy(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> None:
    images = request.getfixturevalue("tiny_image_dir")
    env = TwoHosts(tmp_path_factory.mktemp("smp"), images, "smp")
    try:
        a = env.api
        pool = a.query("QueryPrimaryStorage", ("uuid", "=", env.ps))[0]
        assert pool["type"] == "SharedMountPoint" and pool["totalCapacity"] > 0
        vm = env.create("shared", hostUuid=env.h1)
        u, root = vm["uuid"], vm["allVolumes"][0]
        assert root["installPath"].startswith(str(env.ps_url))
        env.wait_boot(env.h1, u)
        assert a.query("QueryPrimaryStorage", ("uuid", "=", env.ps))[0]["availableCapacity"] == (
            pool["availableCapacity"] - root["size"])
        files = sorted(p.name for p in env.ps_url.rglob("*.qcow2"))

        # live migration needs two machines: refused clearly here (one libvirtd)
        err = a.fails("MigrateVm", vmInstanceUuid=u, hostUuid=env.h2)
        assert "one machine" in err["details"]

        a.call("StopVmInstance", uuid=u)
        started = a.call("StartVmInstance", uuid=u, hostUuid=env.h2)["inventory"]
        assert started["state"] == "Running" and started["hostUuid"] == env.h2
        env.wait_boot(env.h2, u)
        assert root["installPath"] in virsh("domblklist", f"nimbo-{u}").stdout  # the same file
        assert sorted(p.name for p in env.ps_url.rglob("*.qcow2")) == files  # nothing copied
        # a snapshot of the VM running on host 2, on the shared storage
        snap = a.call("CreateVolumeSnapshot", volumeUuid=root["uuid"], name="on-host2")["inventory"]
        assert snap["primaryStorageInstallPath"] == root["installPath"]
        a.call("StopVmInstance", uuid=u)
        assert a.call("StartVmInstance", uuid=u, hostUuid=env.h1)["inventory"]["hostUuid"] == env.h1
        env.wait_boot(env.h1, u, 90)
        a.call("UpdateGlobalConfig", category="vm", name="deletionPolicy", value="Direct")
        a.call("DestroyVmInstance", uuid=u)
        assert not list(env.ps_url.rglob("rootVolumes/*/*/*.qcow2"))
    finally:
        env.close()
