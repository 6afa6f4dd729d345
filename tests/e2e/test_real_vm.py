"""Real VMs through the whole platform: API → management node → agent → libvirt → QEMU (TCG here).

One module-scoped zone with this machine as a KVM host; the tiny guest (images/build-tiny) tells on
its serial console what it saw. Skips, with the reason, when libvirtd or the image is missing."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Api, Running, free_port, wait_for

sys.path.insert(0, os.path.dirname(__file__))
from image_fixtures import tiny_image_dir  # noqa: E402, F401  (pytest fixture)

pytestmark = pytest.mark.e2e

pytest.importorskip("libvirt", reason="libvirt-python is not installed: .ci/run installs it")
if subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode != 0:
    pytest.skip("libvirtd not running: run scripts/start-libvirtd", allow_module_level=True)


class Zone:
    def __init__(self, node: Running, api: Api, root: Path, images: Path) -> None:
        self.node, self.api, self.root = node, api, root
        self.bridge = f"nbt{uuid.uuid4().hex[:8]}"
        a = api
        zone = a.call("CreateZone", name="real")["inventory"]["uuid"]
        cluster = a.call("CreateCluster", name="kvm", zoneUuid=zone, hypervisorType="KVM")["inventory"]["uuid"]
        ps = a.call("AddLocalPrimaryStorage", name="ps", zoneUuid=zone, url=str(root / "ps"))["inventory"]["uuid"]
        a.call("AttachPrimaryStorageToCluster", primaryStorageUuid=ps, clusterUuid=cluster)
        tags = [f"agentPort::{node.agent_port}"]
        self.host = a.call("AddKVMHost", name="me", managementIp="127.0.0.1", username="root", password="x",
                           clusterUuid=cluster, systemTags=tags)["inventory"]
        bs = a.call("AddSftpBackupStorage", name="bs", hostname="127.0.0.1", username="root", password="x",
                    url=str(root / "bs"), systemTags=tags)["inventory"]["uuid"]
        a.call("AttachBackupStorageToZone", backupStorageUuid=bs, zoneUuid=zone)
        self.image = a.call("AddImage", name="tiny", url=str(images / "tiny.qcow2"), format="qcow2",
                            backupStorageUuids=[bs])["inventory"]
        self.iso = a.call("AddImage", name="tiny-iso", url=str(images / "tiny.iso"), format="iso",
                          mediaType="ISO", backupStorageUuids=[bs])["inventory"]
        l2 = a.call("CreateL2NoVlanNetwork", name="l2", zoneUuid=zone, physicalInterface="nimbonone0",
                    systemTags=[f"bridge::{self.bridge}"])["inventory"]["uuid"]
        a.call("AttachL2NetworkToCluster", l2NetworkUuid=l2, clusterUuid=cluster)
        self.l3 = a.call("CreateL3Network", name="l3", l2NetworkUuid=l2)["inventory"]["uuid"]
        a.call("AddIpRange", l3NetworkUuid=self.l3, name="r", startIp="198.19.7.10", endIp="198.19.7.200",
               netmask="255.255.255.0", gateway="198.19.7.1")
        self.offering = a.call("CreateInstanceOffering", name="tiny", cpuNum=1, cpuSpeed=1,
                               memorySize=128 << 20)["inventory"]["uuid"]
        self.disk = a.call("CreateDiskOffering", name="d", diskSize=64 << 20)["inventory"]["uuid"]

    def create(self, name: str, **extra: Any) -> dict[str, Any]:
        params = {"imageUuid": self.image["uuid"], "l3NetworkUuids": [self.l3], **extra}
        return self.api.call("CreateVmInstance", name=name, instanceOfferingUuid=self.offering, **params)["inventory"]

    def console(self, vm_uuid: str) -> str:
        path = self.root / "data" / "agent" / "console" / f"{vm_uuid}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_console(self, vm_uuid: str, pattern: str, timeout: float = 60, after: int = 0) -> str:
        return wait_for(lambda: re.search(pattern, self.console(vm_uuid)[after:]), timeout,
                        f"{pattern!r} on the console of {vm_uuid}").group(0)

    def state(self, vm_uuid: str) -> str:
        return self.api.query("QueryVmInstance", ("uuid", "=", vm_uuid))[0]["state"]


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Zone]:
    images = request.getfixturevalue("tiny_image_dir")
    root = tmp_path_factory.mktemp("real")
    node = Running(root / "data", driver="libvirt", agent_port=free_port())
    api = Api(node.url)
    api.login()
    z = Zone(node, api, root, images)
    try:
        yield z
    finally:
        for vm in api.query("QueryVmInstance"):
            virsh("destroy", f"nimbo-{vm['uuid']}")
            virsh("undefine", f"nimbo-{vm['uuid']}")
        node.stop()
        subprocess.run(["ip", "link", "del", z.bridge], capture_output=True)


def test_host_capacity_comes_from_the_machine(zone: Zone) -> None:
    host = zone.api.query("QueryHost", ("uuid", "=", zone.host["uuid"]))[0]
    assert host["status"] == "Connected" and host["hypervisorType"] == "KVM"
    assert host["totalCpuCapacity"] >= os.cpu_count() and host["totalMemoryCapacity"] > 1 << 30
    assert zone.image["size"] > 0 and zone.image["status"] == "Ready"


def test_vm_lifecycle_on_a_real_guest(zone: Zone) -> None:
    vm = zone.create("life")
    u = vm["uuid"]
    assert vm["state"] == "Running" and vm["hostUuid"] == zone.host["uuid"]
    assert virsh("domstate", f"nimbo-{u}").stdout.strip() == "running"
    root = Path(vm["allVolumes"][0]["installPath"])
    assert root.exists() and "backing file" in subprocess.run(
        ["qemu-img", "info", "-U", str(root)], capture_output=True, text=True).stdout
    zone.wait_console(u, r"NIMBO-BOOT")

    # the console answers a VNC client
    addr = zone.api.call("GetVmConsoleAddress", uuid=u)
    assert addr["protocol"] == "vnc"
    with socket.create_connection((addr["hostIp"], addr["port"]), timeout=10) as sock:
        assert sock.recv(12).startswith(b"RFB 003.00")

    # a data volume, hot-plugged and seen by the guest
    zone.wait_console(u, r"NIMBO-READY", 90)
    vol = zone.api.call("CreateDataVolume", name="data", diskOfferingUuid=zone.disk)["inventory"]
    mark = len(zone.console(u))
    att = zone.api.call("AttachDataVolumeToVm", vmInstanceUuid=u, volumeUuid=vol["uuid"])["inventory"]
    assert Path(att["installPath"]).exists()
    zone.wait_console(u, r"NIMBO-DISK-ADDED vdb", 30, after=mark)
    mark = len(zone.console(u))
    zone.api.call("DetachDataVolumeFromVm", uuid=vol["uuid"])
    zone.wait_console(u, r"NIMBO-DISK-REMOVED vdb", 30, after=mark)

    # graceful stop: the guest hears the ACPI button
    mark = len(zone.console(u))
    assert zone.api.call("StopVmInstance", uuid=u)["inventory"]["state"] == "Stopped"
    assert "NIMBO-POWEROFF" in zone.console(u)[mark:]
    assert zone.api.call("StartVmInstance", uuid=u)["inventory"]["state"] == "Running"
    zone.wait_console(u, r"NIMBO-BOOT")
    assert zone.api.call("RebootVmInstance", uuid=u)["inventory"]["state"] == "Running"

    # destroyed for good: domain and files gone
    zone.api.call("UpdateGlobalConfig", category="vm", name="deletionPolicy", value="Direct")
    try:
        zone.api.call("DestroyVmInstance", uuid=u)
    finally:
        zone.api.call("UpdateGlobalConfig", category="vm", name="deletionPolicy", value="Delay")
    assert virsh("domstate", f"nimbo-{u}").returncode != 0
    assert not root.exists()
    zone.api.call("UpdateGlobalConfig", category="volume", name="deletionPolicy", value="Direct")
    zone.api.call("DeleteDataVolume", uuid=vol["uuid"])
    assert not Path(att["installPath"]).exists()


def test_state_changes_outside_the_platform_are_seen_within_2_seconds(zone: Zone) -> None:
    u = zone.create("sync")["uuid"]
    zone.wait_console(u, r"NIMBO-BOOT")
    assert guest_nice(u) == {5}  # busy guests do not slow the agent, DHCP or the next start
    assert virsh("destroy", f"nimbo-{u}").returncode == 0
    t0 = time.monotonic()
    wait_for(lambda: zone.state(u) == "Stopped", 2, "Stopped after virsh destroy", every=0.05)
    assert time.monotonic() - t0 < 2
    assert virsh("start", f"nimbo-{u}").returncode == 0
    wait_for(lambda: zone.state(u) == "Running", 2, "Running after virsh start", every=0.05)
    # a guest started outside the platform also yields the CPUs to the host's own work
    wait_for(lambda: guest_nice(u) == {5}, 2, "QEMU's threads at nice 5")
    zone.api.call("DestroyVmInstance", uuid=u)


def guest_nice(vm_uuid: str) -> set[int]:
    """The niceness of every thread of the VM's QEMU."""
    pid = Path(f"/run/libvirt/qemu/nimbo-{vm_uuid}.pid").read_text().strip()
    return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def test_vm_from_iso_boots_cdrom_then_disk_after_install(zone: Zone) -> None:
    vm = zone.create("iso", imageUuid=zone.iso["uuid"], rootDiskOfferingUuid=zone.disk)
    u = vm["uuid"]
    assert zone.api.call("GetVmBootOrder", uuid=u)["orders"] == ["CdRom", "HardDisk"]
    zone.wait_console(u, r"NIMBO-BOOTED-FROM=iso", 60)
    zone.wait_console(u, r"NIMBO-READY", 90)
    # the install is done; rebooting switches it to its disk (the console log starts anew)
    zone.api.call("RebootVmInstance", uuid=u)
    assert zone.api.call("GetVmBootOrder", uuid=u)["orders"] == ["HardDisk"]
    zone.wait_console(u, r"NIMBO-BOOTED-FROM=disk", 60)
    # attaching an ISO does not change the order
    zone.api.call("AttachIsoToVmInstance", vmInstanceUuid=u, isoUuid=zone.iso["uuid"])
    assert zone.api.call("GetVmBootOrder", uuid=u)["orders"] == ["HardDisk"]
    zone.api.call("DetachIsoFromVmInstance", vmInstanceUuid=u)
    zone.api.call("DestroyVmInstance", uuid=u)


def test_failures_roll_back_and_the_host_stays_usable(zone: Zone) -> None:
    before = zone.api.query("QueryHost", ("uuid", "=", zone.host["uuid"]))[0]
    vms_before = {v["uuid"] for v in zone.api.query("QueryVmInstance")}
    files_before = sorted(p.name for p in (zone.root / "ps").rglob("*.qcow2"))
    zone.api.call("UpdateGlobalConfig", category="kvm", name="vm.cpuMode", value="host-passthrough")
    try:
        err = zone.api.fails("CreateVmInstance", name="nope", imageUuid=zone.image["uuid"],
                             instanceOfferingUuid=zone.offering, l3NetworkUuids=[zone.l3])
    finally:
        zone.api.call("UpdateGlobalConfig", category="kvm", name="vm.cpuMode", value="none")
    assert "host-passthrough" in err["description"] + err["details"]
    assert {v["uuid"] for v in zone.api.query("QueryVmInstance")} == vms_before
    assert sorted(p.name for p in (zone.root / "ps").rglob("*.qcow2")) == files_before
    after = zone.api.query("QueryHost", ("uuid", "=", zone.host["uuid"]))[0]
    assert after["availableMemoryCapacity"] == before["availableMemoryCapacity"]
    assert not [d for d in virsh("list", "--all", "--name").stdout.split() if "nope" in d]
    assert shutil.which("qemu-img")
    u = zone.create("after-failure")["uuid"]
    assert zone.state(u) == "Running"
    zone.api.call("DestroyVmInstance", uuid=u)


def test_flat_dhcp_and_userdata_reach_a_real_guest(zone: Zone) -> None:
    """The spec's headline: DHCP and userdata from the host the VM runs on, no router VM."""
    a = zone.api
    l2 = a.query("QueryL3Network", ("uuid", "=", zone.l3))[0]["l2NetworkUuid"]
    l3 = a.call("CreateL3Network", name="flat", l2NetworkUuid=l2)["inventory"]["uuid"]
    a.call("AddIpRange", l3NetworkUuid=l3, name="r", startIp="198.19.8.10", endIp="198.19.8.200",
           netmask="255.255.255.0", gateway="198.19.8.1")
    a.call("AddDnsToL3Network", l3NetworkUuid=l3, dns="198.19.8.1")
    flat = a.query("QueryNetworkServiceProvider", ("type", "=", "Flat"))[0]["uuid"]
    a.call("AttachNetworkServiceProviderToL2Network", l2NetworkUuid=l2, networkServiceProviderUuid=flat)
    a.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3, networkServices={flat: ["DHCP", "Userdata"]})
    key = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC5x3AoWuiZawxXoBxEcOhhdVAST4kJA root@yyy"
    vm = zone.create("flat-vm", l3NetworkUuids=[l3],
                     systemTags=["userdata::#cloud-config\\nhostname: fromuserdata", f"sshkey::{key}",
                                 "hostname::web-1"])
    ip = vm["vmNics"][0]["ip"]
    u = vm["uuid"]
    line = zone.wait_console(u, r"NIMBO-DHCP \S+ ip=\S+.*", 90)
    assert f"ip={ip}" in line and "hostname=web-1" in line and "router=198.19.8.1" in line
    block = zone.wait_console(u, r"NIMBO-USERDATA-BEGIN[\s\S]*?NIMBO-USERDATA-END", 60)
    assert "#cloud-config\nhostname: fromuserdata" in block.replace("\r", "")
    keys = zone.wait_console(u, r"NIMBO-SSHKEYS-BEGIN[\s\S]*?NIMBO-SSHKEYS-END", 30)
    assert key in keys
    assert re.search(rf"NIMBO-EC2-INSTANCE-ID {u}", zone.wait_console(u, r"NIMBO-EC2-\S+ ?\S*", 30))
    a.call("DestroyVmInstance", uuid=u)
    a.call("ExpungeVmInstance", uuid=u)
    a.call("DeleteL3Network", uuid=l3)
