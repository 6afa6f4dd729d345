"""The tiny test guest (images/build-tiny) boots under QEMU TCG and says so.

Boots tiny.qcow2 with qemu-system-x86_64 (TCG, -netdev user) and checks the
NIMBO- lines on its serial console: boot, DHCP, metadata (when a private
network namespace can be made), READY, hot-plugged disk, ACPI power-off; then
boots tiny.iso onto a blank disk and reboots into the installed disk.
No libvirt needed.  Skips when qemu-system-x86_64 or the build tools are missing.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from image_fixtures import (  # noqa: E402
    EC2_FILES,
    META_FILES,
    TinyVM,
    require_qemu,
    tiny_image_dir,  # noqa: F401  (pytest fixture)
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def vms(request, tmp_path_factory):
    """Both guests start at once (TCG uses about one core each): the disk
    image, and the ISO with an empty disk to install onto."""
    require_qemu()  # skip before spending time on a build
    image_dir = request.getfixturevalue("tiny_image_dir")
    disk = TinyVM(tmp_path_factory.mktemp("tiny-disk"), disk=image_dir / "tiny.qcow2",
                  metadata=True, hostname="tinyhost")
    isodir = tmp_path_factory.mktemp("tiny-iso")
    blank = isodir / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(blank), "256M"], check=True, capture_output=True)
    iso = TinyVM(isodir / "vm", disk=blank, snapshot=False, iso=image_dir / "tiny.iso",
                 boot_once_cdrom=True, metadata=True)
    disk.start()
    iso.start()
    yield {"disk": disk, "iso": iso}
    disk.stop()
    iso.stop()


@pytest.fixture(scope="module")
def disk_vm(vms):
    return vms["disk"]


def test_disk_image_boots(disk_vm):
    disk_vm.wait_for(r"NIMBO-BOOT \d+\.\d+", timeout=40)
    disk_vm.wait_for(r"NIMBO-BOOTED-FROM=disk", timeout=5)


def test_dhcp_on_first_nic(disk_vm):
    m = disk_vm.wait_for(
        r"NIMBO-DHCP eth0 ip=(\d+\.\d+\.\d+\.\d+) mask=(\S*) router=(\S*) dns=(\S*) "
        r"hostname=(\S*) server=(\S*)",
        timeout=30,
    )
    ip, mask, _router, _dns, hostname, server = m.groups()
    assert ip == "10.0.2.15"
    assert mask == "255.255.255.0"
    assert hostname == "tinyhost"
    assert server == "10.0.2.2"


def test_ready(disk_vm):
    m = disk_vm.wait_for(r"NIMBO-READY (\d+\.\d+)", timeout=45)
    print(f"tiny guest: NIMBO-READY at guest uptime {m.group(1)} s, {disk_vm.elapsed():.1f} s after QEMU start")


def test_metadata(disk_vm):
    if not disk_vm.metadata:
        pytest.skip("no private network namespace (unshare -n) here: metadata service not served")
    log = disk_vm.log()
    assert f"NIMBO-INSTANCE-ID {META_FILES['latest/meta-data/instance-id']}" in log
    assert f"NIMBO-HOSTNAME {META_FILES['latest/meta-data/local-hostname']}" in log
    assert f"NIMBO-EC2-INSTANCE-ID {EC2_FILES['latest/meta-data/instance-id']}" in log
    keys = log.split("NIMBO-SSHKEYS-BEGIN", 1)[1].split("NIMBO-SSHKEYS-END", 1)[0]
    assert META_FILES["latest/meta-data/public-keys"].strip() in keys
    userdata = log.split("NIMBO-USERDATA-BEGIN", 1)[1].split("NIMBO-USERDATA-END", 1)[0]
    assert "nimbo_test: 42" in userdata


def test_disk_hotplug(disk_vm, tmp_path):
    blank = tmp_path / "hot.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(blank), "64M"], check=True, capture_output=True)
    disk_vm.qmp(
        "blockdev-add", driver="qcow2", **{"node-name": "hot0"}, file={"driver": "file", "filename": str(blank)}
    )
    disk_vm.qmp("device_add", driver="virtio-blk-pci", drive="hot0", id="hotdisk")
    disk_vm.wait_for(r"NIMBO-DISK-ADDED vdb 67108864", timeout=20)
    disk_vm.qmp("device_del", id="hotdisk")
    disk_vm.wait_for(r"NIMBO-DISK-REMOVED vdb", timeout=20)


def test_acpi_poweroff(disk_vm):
    disk_vm.qmp("system_powerdown")
    disk_vm.wait_for(r"NIMBO-POWEROFF", timeout=20)
    assert disk_vm.wait_exit(20) == 0


def test_iso_installs_to_blank_disk(vms):
    vm = vms["iso"]
    vm.wait_for(r"NIMBO-BOOTED-FROM=iso", timeout=40)
    vm.wait_for(r"NIMBO-INSTALLED vda", timeout=40)
    vm.wait_for(r"NIMBO-READY", timeout=40)
    vm.wait_for(r"nimbo-tiny# ", timeout=10)
    vm.send("reboot\n")  # to the guest's shell on ttyS0; the next boot is from the disk
    vm.wait_for(r"NIMBO-REBOOT", timeout=15)
    vm.wait_for(r"NIMBO-BOOTED-FROM=disk", timeout=40)
    vm.wait_for(r"NIMBO-READY", timeout=40)
