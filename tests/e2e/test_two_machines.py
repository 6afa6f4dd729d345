"""Hosts that are machines of their own, whose agents can die: live migration (MigrateVm, 1.0 §9,
1.2 shared mount point) and what an agent killed mid-work, a missing image or a full storage leave.

Two hosts that share one libvirtd cannot migrate to each other, so each host here is a
``Machine`` (tests/e2e/machine.py): its own network, mount and UTS namespaces, its own libvirtd
listening on TCP with its own host UUID, and a nimbostack libvirt agent. Both plug into one test
bridge (198.18.200.0/24) where the management node listens; their volumes are on a
SharedMountPoint directory that both see, as with NFS. The guest is the tiny image, on a Flat
L3 network (DHCP and userdata from the host it runs on).

An agent is killed while libvirt streams the guest's memory (throttled to a few MiB/s so it
takes seconds): libvirt finishes without it, and the management node, asking the destination,
records where the VM really is. An agent killed while it holds an expunge request: the garbage
collector finishes the deletion when it is back. An agent killed in the middle of a VM creation:
the creation fails and rolls back; what the dead host could not undo at once is undone when it
is back (no domain, no volume file, no capacity or IP held)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Api, ApiError, Running, wait_for

sys.path.insert(0, os.path.dirname(__file__))
from image_fixtures import tiny_image_dir  # noqa: E402, F401  (pytest fixture)
from machine import Machine, Wire  # noqa: E402

pytestmark = pytest.mark.e2e

pytest.importorskip("libvirt", reason="libvirt-python is not installed: .ci/run installs it")
for _tool in ("unshare", "nsenter", "libvirtd", "virtlogd"):
    if subprocess.run(["which", _tool], capture_output=True).returncode != 0:
        pytest.skip(f"{_tool} is missing: .ci/run installs util-linux and scripts/libvirt-packages.txt",
                    allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("making network and mount namespaces needs root (CI runs as root)", allow_module_level=True)


class Cloud:
    def __init__(self, root: Path, images: Path) -> None:
        self.root = root
        self.wire = Wire("198.18.200.1")
        self.machines: list[Machine] = []
        self.node: Running | None = None
        try:
            self.machines = [Machine(root / f"m{i}", self.wire, f"198.18.200.{i}", root / "data") for i in (2, 3)]
            self.node = Running(root / "data", driver="libvirt", listen=self.wire.ip)
            self._build(images)
        except BaseException:
            self.close()
            raise

    def _build(self, images: Path) -> None:
        assert self.node is not None
        self.api = a = Api(self.node.url)
        a.login()
        self.smp = self.root / "smp"
        self.smp.mkdir()
        zone = a.call("CreateZone", name="live")["inventory"]["uuid"]
        cluster = a.call("CreateCluster", name="kvm", zoneUuid=zone, hypervisorType="KVM")["inventory"]["uuid"]
        self.ps = a.call("AddSharedMountPointPrimaryStorage", name="smp", zoneUuid=zone,
                         url=str(self.smp))["inventory"]["uuid"]
        a.call("AttachPrimaryStorageToCluster", primaryStorageUuid=self.ps, clusterUuid=cluster)
        self.hosts = [
            a.call("AddKVMHost", name=f"host{i}", managementIp=m.ip, username="root", password="x",
                   clusterUuid=cluster)["inventory"]["uuid"]
            for i, m in enumerate(self.machines, 1)
        ]
        self.bs_dir = self.root / "bs"
        self.bs = bs = a.call("AddSftpBackupStorage", name="bs", hostname=self.machines[0].ip, username="root",
                              password="x", url=str(self.bs_dir))["inventory"]["uuid"]
        a.call("AttachBackupStorageToZone", backupStorageUuid=bs, zoneUuid=zone)
        self.image_file = images / "tiny.qcow2"
        self.image = a.call("AddImage", name="tiny", url=str(self.image_file), format="qcow2",
                            backupStorageUuids=[bs])["inventory"]["uuid"]
        l2 = a.call("CreateL2NoVlanNetwork", name="l2", zoneUuid=zone, physicalInterface="nimbonone0",
                    systemTags=["bridge::nbrlive0"])["inventory"]["uuid"]
        a.call("AttachL2NetworkToCluster", l2NetworkUuid=l2, clusterUuid=cluster)
        self.l3 = a.call("CreateL3Network", name="l3", l2NetworkUuid=l2)["inventory"]["uuid"]
        a.call("AddIpRange", l3NetworkUuid=self.l3, name="r", startIp="198.19.7.10", endIp="198.19.7.200",
               netmask="255.255.255.0", gateway="198.19.7.1")
        flat = a.query("QueryNetworkServiceProvider", ("type", "=", "Flat"))[0]["uuid"]
        a.call("AttachNetworkServiceProviderToL2Network", l2NetworkUuid=l2, networkServiceProviderUuid=flat)
        a.call("AttachNetworkServiceToL3Network", l3NetworkUuid=self.l3, networkServices={flat: ["DHCP", "Userdata"]})
        self.offering = a.call("CreateInstanceOffering", name="tiny", cpuNum=1, cpuSpeed=1,
                               memorySize=128 << 20)["inventory"]["uuid"]
        self.disk = a.call("CreateDiskOffering", name="d", diskSize=64 << 20)["inventory"]["uuid"]

    def machine(self, host_uuid: str) -> Machine:
        return self.machines[self.hosts.index(host_uuid)]

    def create(self, name: str, host: str, **extra: Any) -> dict[str, Any]:
        return self.api.call("CreateVmInstance", name=name, imageUuid=self.image, instanceOfferingUuid=self.offering,
                             l3NetworkUuids=[self.l3], hostUuid=host, **extra)["inventory"]

    def snapshot(self) -> dict[str, Any]:
        """What a failed creation must leave as it found it."""
        a = self.api
        return {
            "vms": sorted(v["uuid"] for v in a.query("QueryVmInstance")),
            "volumes": sorted(v["uuid"] for v in a.query("QueryVolume")),
            "files": sorted(str(p.relative_to(self.smp)) for p in self.smp.rglob("*.qcow2")),
            "hosts": {h["uuid"]: (h["availableCpuCapacity"], h["availableMemoryCapacity"])
                      for h in a.query("QueryHost")},
            "storage": a.query("QueryPrimaryStorage", ("uuid", "=", self.ps))[0]["availableCapacity"],
            "ips": a.call("GetIpAddressCapacity", l3NetworkUuids=[self.l3])["availableCapacity"],
            "domains": [sorted(m.virsh("list", "--all", "--name").stdout.split()) for m in self.machines],
        }

    def console(self, vm: dict[str, Any]) -> str:
        """The guest's serial log: one file on the shared filesystem, written by whichever host runs it."""
        found = [p for m in self.machines for p in (m.state / "console").glob(f"{vm['uuid']}.log")]
        return "".join(p.read_text(errors="replace") for p in found)

    def runs_on(self, vm_uuid: str) -> list[str]:
        """The hosts whose libvirtd has the domain, and its state there."""
        return [
            f"{h}:{out.stdout.strip()}"
            for h, mach in zip(self.hosts, self.machines, strict=True)
            if (out := mach.virsh("domstate", f"nimbo-{vm_uuid}")).returncode == 0
        ]

    def vm(self, vm_uuid: str) -> dict[str, Any]:
        return self.api.query("QueryVmInstance", ("uuid", "=", vm_uuid))[0]

    def memory(self) -> dict[str, int]:
        return {h["uuid"]: h["availableMemoryCapacity"] for h in self.api.query("QueryHost")}

    def dhcp_macs(self, host: str) -> str:
        return self.machine(host).sh("cat /run/nimbostack/flat/*/dhcp-hosts 2>/dev/null").lower()

    def gc(self, host: str) -> list[dict[str, Any]]:
        """The garbage collector's pending work for a host."""
        from nimbostack.core import gc

        assert self.node is not None
        return self.node.run(gc.entries(self.node.platform, status="Pending", host_uuid=host))

    def close(self) -> None:
        for mach in self.machines:
            mach.close()
        if self.node is not None:
            self.node.stop()
        self.wire.close()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Cloud]:
    images = request.getfixturevalue("tiny_image_dir")
    env = Cloud(tmp_path_factory.mktemp("live"), images)
    try:
        yield env
    finally:
        env.close()


@pytest.fixture(autouse=True)
def agents_up(cloud: Cloud) -> Iterator[None]:
    """A test that fails between killing an agent and starting it again leaves the next tests a
    working cloud, so that one failure is reported once."""
    yield
    for host, mach in zip(cloud.hosts, cloud.machines, strict=True):
        if mach.revive():
            cloud.api.call("ReconnectHost", uuid=host)


def test_a_running_guest_moves_to_the_other_machine_and_keeps_running(cloud: Cloud) -> None:
    a = cloud.api
    h1, h2 = cloud.hosts
    vm = cloud.create("mover", h1)
    u, mac = vm["uuid"], vm["vmNics"][0]["mac"]
    wait_for(lambda: "NIMBO-READY" in cloud.console(vm), 120, "the guest to boot, take its lease and userdata")
    assert re.search(rf"NIMBO-DHCP \S+ ip={re.escape(vm['vmNics'][0]['ip'])}", cloud.console(vm))
    assert cloud.runs_on(u) == [f"{h1}:running"]
    candidates = [h["uuid"] for h in a.call("GetVmMigrationCandidateHosts", vmInstanceUuid=u)["inventories"]]
    assert candidates == [h2]
    memory = cloud.memory()
    files = sorted(p.relative_to(cloud.smp) for p in cloud.smp.rglob("*") if p.is_file())

    moved = a.call("MigrateVm", vmInstanceUuid=u, hostUuid=h2)["inventory"]
    assert moved["hostUuid"] == h2 and moved["state"] == "Running"
    # the domain left host 1's libvirtd (undefined there) and runs under host 2's
    assert cloud.runs_on(u) == [f"{h2}:running"]
    assert u in cloud.machine(h2).virsh("dominfo", f"nimbo-{u}").stdout
    assert f"nimbo-{u}" in cloud.machine(h2).virsh("list", "--persistent", "--name").stdout
    qemu = [p for p in cloud.machine(h2).pids() if u in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    assert qemu, "no QEMU of the VM in host 2's namespaces"
    # nothing copied: the same files on the shared storage
    assert sorted(p.relative_to(cloud.smp) for p in cloud.smp.rglob("*") if p.is_file()) == files
    # capacity moved with it
    after = cloud.memory()
    assert after[h1] == memory[h1] + (128 << 20) and after[h2] == memory[h2] - (128 << 20)
    # its DHCP entry followed it: host 2's dnsmasq knows the MAC, host 1's forgot it
    wait_for(lambda: mac in cloud.dhcp_macs(h2), 10, "host 2's DHCP entry")
    assert mac not in cloud.dhcp_macs(h1)

    # the same guest, not a reboot: no second boot, and it sees a disk hot-plugged on host 2
    assert cloud.console(vm).count("NIMBO-READY") == 1
    volume = a.call("CreateDataVolume", name="late", diskOfferingUuid=cloud.disk)["inventory"]["uuid"]
    a.call("AttachDataVolumeToVm", vmInstanceUuid=u, volumeUuid=volume)
    wait_for(lambda: re.search(r"NIMBO-DISK-ADDED vd\w 67108864", cloud.console(vm)), 30,
             "the guest to see the disk attached on host 2")
    assert cloud.console(vm).count("NIMBO-READY") == 1
    time.sleep(1)  # host 1 must not claim the VM back from a late event
    assert cloud.vm(u)["hostUuid"] == h2 and cloud.vm(u)["state"] == "Running"

    # and back again, disk and all
    back = a.call("MigrateVm", vmInstanceUuid=u, hostUuid=h1)["inventory"]
    assert back["hostUuid"] == h1 and cloud.runs_on(u) == [f"{h1}:running"]
    a.call("DetachDataVolumeFromVm", uuid=volume)
    wait_for(lambda: "NIMBO-DISK-REMOVED" in cloud.console(vm), 30, "the guest to see the disk go on host 1")
    assert cloud.console(vm).count("NIMBO-READY") == 1
    a.call("DeleteDataVolume", uuid=volume)
    a.call("DestroyVmInstance", uuid=u)
    assert cloud.runs_on(u) == []


def test_refusals_say_why(cloud: Cloud) -> None:
    a = cloud.api
    h1, h2 = cloud.hosts
    vm = cloud.create("stay", h1)
    u = vm["uuid"]
    err = a.fails("MigrateVm", vmInstanceUuid=u, hostUuid=h1)
    assert "already" in err["details"]
    a.call("UpdateGlobalConfig", category="kvm", name="vm.cpuMode", value="host-model")
    try:
        # the same CPU on both: host-model is allowed; the rule only bites between different CPUs
        # (tests/integration/test_migration.py shows that refusal with simulated CPUs)
        assert a.call("GetVmMigrationCandidateHosts", vmInstanceUuid=u)["inventories"][0]["uuid"] == h2
    finally:
        a.call("UpdateGlobalConfig", category="kvm", name="vm.cpuMode", value="none")
    a.call("StopVmInstance", uuid=u)
    err = a.fails("MigrateVm", vmInstanceUuid=u, hostUuid=h2)
    assert "only a Running VM migrates live" in err["details"]
    a.call("DestroyVmInstance", uuid=u)


def test_killing_the_source_agent_mid_migration_leaves_the_vm_where_it_runs(cloud: Cloud) -> None:
    a = cloud.api
    h1, h2 = cloud.hosts
    src = cloud.machine(h1)
    vm = cloud.create("cut", h1)
    u, mac = vm["uuid"], vm["vmNics"][0]["mac"]
    wait_for(lambda: "NIMBO-READY" in cloud.console(vm), 120, "the guest to boot")
    memory = cloud.memory()
    # a slow stream (MiB/s), so the kill lands in the middle of it
    assert src.virsh("migrate-setspeed", f"nimbo-{u}", "--bandwidth", "2").returncode == 0

    outcome: list[Any] = []

    def migrate() -> None:
        a2 = Api(cloud.api.base)
        a2.session = a.session
        try:
            outcome.append(a2.call("MigrateVm", vmInstanceUuid=u, hostUuid=h2)["inventory"])
        except ApiError as err:
            outcome.append(err)

    t = threading.Thread(target=migrate)
    t.start()
    wait_for(lambda: "Unbounded" in src.virsh("domjobinfo", f"nimbo-{u}").stdout, 30, "the migration to run")
    src.kill_agent()
    t.join(120)
    assert outcome, "MigrateVm did not answer"

    # libvirt finished without the agent; the management node asked the destination
    where = cloud.runs_on(u)
    assert f"{h2}:running" in where and f"{h1}:running" not in where, where
    assert isinstance(outcome[0], dict) and outcome[0]["hostUuid"] == h2
    assert cloud.vm(u)["hostUuid"] == h2 and cloud.vm(u)["state"] == "Running"
    # whatever the source's libvirtd kept of the domain (a shut-off copy, when its job did not end
    # cleanly) waits in the GC for the source's agent
    assert [(e["name"], e["resourceUuid"]) for e in cloud.gc(h1)] == [("destroy-vm", u)]

    # the source comes back: its leftovers go (domain, DHCP entry), and the VM stays where it runs
    src.start_agent()
    a.call("ReconnectHost", uuid=h1)
    wait_for(lambda: not cloud.gc(h1), 30, "the GC to remove the source's copy of the domain")
    assert cloud.runs_on(u) == [f"{h2}:running"]
    assert mac not in cloud.dhcp_macs(h1) and mac in cloud.dhcp_macs(h2)
    row = cloud.vm(u)
    assert (row["hostUuid"], row["state"]) == (h2, "Running")
    after = cloud.memory()
    assert after[h1] == memory[h1] + (128 << 20) and after[h2] == memory[h2] - (128 << 20)
    assert cloud.console(vm).count("NIMBO-READY") == 1
    a.call("DestroyVmInstance", uuid=u)
    assert cloud.runs_on(u) == []


def test_an_agent_killed_in_the_middle_of_an_expunge_finishes_it_when_back(cloud: Cloud) -> None:
    a = cloud.api
    h1, _ = cloud.hosts
    mach = cloud.machine(h1)
    vm = cloud.create("gone", h1)
    u, root = vm["uuid"], Path(vm["allVolumes"][0]["installPath"])
    a.call("DestroyVmInstance", uuid=u)  # Delay: the root volume's file stays until expunged
    assert root.exists()

    mach.freeze_agent()  # the expunge's delete request reaches the agent and is never answered ...
    outcome: list[Any] = []

    def expunge() -> None:
        a2 = Api(cloud.api.base)
        a2.session = a.session
        try:
            outcome.append(a2.call("ExpungeVmInstance", uuid=u))
        except ApiError as err:
            outcome.append(err)

    t = threading.Thread(target=expunge)
    t.start()
    time.sleep(2)
    assert not outcome and root.exists()
    mach.kill_agent()  # ... and the agent dies holding it
    t.join(60)
    # the user's expunge is done; the file's deletion waits in the GC for the host
    assert outcome and isinstance(outcome[0], dict) and outcome[0]["success"]
    assert not a.query("QueryVmInstance", ("uuid", "=", u))
    assert root.exists()
    assert [e["body"]["installPath"] for e in cloud.gc(h1)] == [str(root)]

    mach.start_agent()
    a.call("ReconnectHost", uuid=h1)
    wait_for(lambda: not root.exists(), 30, "the GC to delete the root volume's file")
    assert cloud.gc(h1) == []
    assert not [p for p in cloud.smp.rglob(f"*{vm['allVolumes'][0]['uuid']}*")]



def test_an_agent_killed_in_the_middle_of_a_creation_leaves_nothing_behind(cloud: Cloud) -> None:
    a = cloud.api
    h1, _ = cloud.hosts
    mach = cloud.machine(h1)
    before = cloud.snapshot()
    mach.freeze_agent()  # the creation's first request to the host is received and never answered ...
    outcome: list[Any] = []

    def create() -> None:
        a2 = Api(cloud.api.base)
        a2.session = a.session
        try:
            outcome.append(a2.call("CreateVmInstance", name="cut-short", imageUuid=cloud.image,
                                   instanceOfferingUuid=cloud.offering, l3NetworkUuids=[cloud.l3], hostUuid=h1))
        except ApiError as err:
            outcome.append(err)

    t = threading.Thread(target=create)
    t.start()
    time.sleep(2)
    assert not outcome
    mach.kill_agent()  # ... the agent dies holding it
    t.join(60)
    assert outcome and isinstance(outcome[0], ApiError), outcome
    assert outcome[0].error["code"] and outcome[0].error["description"]

    mach.start_agent()
    a.call("ReconnectHost", uuid=h1)
    wait_for(lambda: not cloud.gc(h1), 30, "the host's leftovers to be cleaned")
    assert cloud.snapshot() == before
    # and the host works
    vm = cloud.create("after", h1)
    assert vm["state"] == "Running"
    a.call("DestroyVmInstance", uuid=vm["uuid"])
    a.call("ExpungeVmInstance", uuid=vm["uuid"])


def test_a_missing_image_file_or_a_full_storage_fail_clearly_and_roll_back(cloud: Cloud) -> None:
    a = cloud.api
    h1, _ = cloud.hosts
    before = cloud.snapshot()
    # an image whose file vanished from the backup storage (never cached on the primary storage yet)
    lost = a.call("AddImage", name="lost", url=str(cloud.image_file), format="qcow2",
                  backupStorageUuids=[cloud.bs])["inventory"]
    for f in cloud.bs_dir.rglob(f"*{lost['uuid']}*"):
        f.unlink()
    err = a.fails("CreateVmInstance", name="no-image", imageUuid=lost["uuid"], instanceOfferingUuid=cloud.offering,
                  l3NetworkUuids=[cloud.l3], hostUuid=h1)
    assert "image" in (err["description"] + err["details"]).lower(), err
    assert not list(cloud.smp.rglob(f"*{lost['uuid']}*"))  # no partial download in the image cache
    a.call("DeleteImage", uuid=lost["uuid"])
    a.call("ExpungeImage", imageUuid=lost["uuid"])
    assert cloud.snapshot() == before

    # a data disk bigger than the storage
    huge = a.call("CreateDiskOffering", name="huge", diskSize=1 << 50)["inventory"]["uuid"]
    err = a.fails("CreateVmInstance", name="too-big", imageUuid=cloud.image, instanceOfferingUuid=cloud.offering,
                  l3NetworkUuids=[cloud.l3], hostUuid=h1, dataDiskOfferingUuids=[huge])
    assert "capacity" in (err["description"] + err["details"]).lower(), err
    assert cloud.snapshot() == before
