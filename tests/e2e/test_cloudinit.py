"""Stock cloud-init (Debian 12's package, unmodified) gets hostname, SSH keys and userdata from the
Flat network provider, through the whole platform (API → management node → agent → libvirt → QEMU).

Two images from images/build-cloudinit, built once into build/cloudinit-image (or
``NIMBO_CLOUDINIT_IMAGE_DIR``) and reused while present:

* cloudinit.qcow2: Debian's default datasource list; the libvirt driver's SMBIOS product
  "CloudStack KVM Hypervisor" makes ds-identify pick the CloudStack datasource, which reads
  http://<DHCP server>/latest/{meta-data,user-data}.
* cloudinit-ec2.qcow2: the same plus only ``datasource_list: [ Ec2 ]`` in
  /etc/cloud/cloud.cfg.d/99-ds.cfg; it reads http://169.254.169.254/<version>/...

Nothing is baked into the images that prints markers: the userdata's runcmd (from the platform)
writes them to the serial console, which the agent logs. Both VMs boot in parallel. Timings are
printed (run with ``-s``). Skips with the reason when libvirtd is not running, the build cannot run
(not root, no debootstrap) or debootstrap cannot reach the Debian mirror."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

pytest.importorskip("libvirt", reason="libvirt-python is not installed: .ci/run installs it")
if subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode != 0:
    pytest.skip("libvirtd not running: run scripts/start-libvirtd", allow_module_level=True)

sys.path.insert(0, os.path.dirname(__file__))
import test_real_vm  # noqa: E402
from image_fixtures import tiny_image_dir  # noqa: E402, F401  (pytest fixture, used by `zone`)
from test_real_vm import Zone, wait_for  # noqa: E402

zone = test_real_vm.zone  # the same module-scoped zone fixture (a zone of its own for this module)

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "images" / "build-cloudinit"
DEFAULT_DIR = REPO / "build" / "cloudinit-image"
IMAGES = ("cloudinit.qcow2", "cloudinit-ec2.qcow2")
MARKER = "NIMBO-CLOUDINIT-USERDATA-RAN"
KEY = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDNimboCloudInitTestKey0123456789abcdef test@nimbo"
USERDATA_TIMEOUT = float(os.environ.get("NIMBO_CLOUDINIT_TIMEOUT", "300"))


def userdata() -> str:
    """#cloud-config whose runcmd reports, on the serial console, what cloud-init applied.

    Written with literal ``\\n`` like the other system tags; ``host=$(hostname)`` is only
    expanded by the guest's shell, so the marker regex cannot match the unexpanded text."""
    lines = [
        "#cloud-config",
        "runcmd:",
        f'  - echo "{MARKER} host=$(hostname) cloudid=$(cloud-id)" > /dev/ttyS0',
        "  - (echo NIMBO-KEYS-BEGIN; cat /home/debian/.ssh/authorized_keys /root/.ssh/authorized_keys;"
        " echo NIMBO-KEYS-END) > /dev/ttyS0 2>&1",
    ]
    return "\\n".join(lines)


@pytest.fixture(scope="session")
def cloudinit_image_dir() -> Path:
    out = Path(os.environ.get("NIMBO_CLOUDINIT_IMAGE_DIR") or DEFAULT_DIR)
    if all((out / name).exists() for name in IMAGES):
        return out
    if os.geteuid() != 0:
        pytest.skip("building the cloud-init images needs root (debootstrap)")
    if not shutil.which("debootstrap", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
        pytest.skip("debootstrap is not installed: apt-get install $(grep -v '^#' images/cloudinit-packages.txt)")
    t0 = time.monotonic()
    proc = subprocess.run([str(BUILD_SCRIPT), str(out)], capture_output=True, text=True)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        tail = proc.stderr[-3000:]
        if "cannot reach the Debian mirror" in proc.stderr:
            pytest.skip(f"debootstrap cannot reach the Debian mirror: {tail}")
        pytest.fail(f"images/build-cloudinit failed ({proc.returncode}):\n{tail}")
    print(f"\n[cloudinit] image build took {took:.1f} s", flush=True)
    return out


def _flat_l3(zone: Zone) -> str:
    """A Flat L3 with DHCP + Userdata, like test_real_vm's test_flat_dhcp_and_userdata_reach_a_real_guest
    (no DNS entry: cloud-init's CloudStack datasource would first try to resolve data-server. there)."""
    a = zone.api
    l2 = a.query("QueryL3Network", ("uuid", "=", zone.l3))[0]["l2NetworkUuid"]
    l3 = a.call("CreateL3Network", name="flat-ci", l2NetworkUuid=l2)["inventory"]["uuid"]
    a.call("AddIpRange", l3NetworkUuid=l3, name="r", startIp="198.19.9.10", endIp="198.19.9.200",
           netmask="255.255.255.0", gateway="198.19.9.1")
    flat = a.query("QueryNetworkServiceProvider", ("type", "=", "Flat"))[0]["uuid"]
    a.call("AttachNetworkServiceProviderToL2Network", l2NetworkUuid=l2, networkServiceProviderUuid=flat)
    a.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3, networkServices={flat: ["DHCP", "Userdata"]})
    return l3


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:].replace("\r", "")


def test_stock_cloudinit_gets_hostname_keys_and_userdata(zone: Zone, cloudinit_image_dir: Path) -> None:
    a = zone.api
    bs = a.query("QueryBackupStorage")[0]["uuid"]
    offering = a.call("CreateInstanceOffering", name="ci", cpuNum=1, cpuSpeed=1,
                      memorySize=512 << 20)["inventory"]["uuid"]
    l3 = _flat_l3(zone)
    cases = {  # datasource -> (image file, hostname)
        "CloudStack": ("cloudinit.qcow2", "ci-vm"),
        "Ec2": ("cloudinit-ec2.qcow2", "ci-vm-ec2"),
    }
    vms: dict[str, dict[str, Any]] = {}
    for ds, (fname, hostname) in cases.items():
        image = a.call("AddImage", name=f"debian12-cloudinit-{ds.lower()}", url=str(cloudinit_image_dir / fname),
                       format="qcow2", platform="Linux", backupStorageUuids=[bs])["inventory"]
        assert image["status"] == "Ready", image
        t0 = time.monotonic()
        vm = a.call("CreateVmInstance", name=f"ci-{ds.lower()}", imageUuid=image["uuid"],
                    instanceOfferingUuid=offering, l3NetworkUuids=[l3],
                    systemTags=[f"userdata::{userdata()}", f"sshkey::{KEY}", f"hostname::{hostname}"])["inventory"]
        assert vm["state"] == "Running", vm
        vms[ds] = {"vm": vm, "t0": t0, "created": time.monotonic() - t0, "hostname": hostname}

    # both guests boot in parallel; wait for each one's runcmd marker
    pattern = rf"{MARKER} host=([\w.-]+) cloudid=(\S*)"
    failures = []
    for ds, info in vms.items():
        u = info["vm"]["uuid"]
        remaining = max(5.0, USERDATA_TIMEOUT - (time.monotonic() - info["t0"]))
        try:
            wait_for(lambda u=u: re.search(pattern, zone.console(u)), remaining, f"{MARKER} from {ds}", every=1)
        except AssertionError as e:
            failures.append(f"{ds}: {e}\n--- console tail of {u} ---\n{_tail(zone.console(u))}")
            continue
        info["userdata_s"] = time.monotonic() - info["t0"]
    for ds, info in vms.items():
        print(f"[cloudinit] {ds}: CreateVmInstance returned after {info['created']:.1f} s, "
              f"userdata ran {info.get('userdata_s', float('nan')):.1f} s after CreateVmInstance", flush=True)
    assert not failures, "\n\n".join(failures)

    for ds, info in vms.items():
        u = info["vm"]["uuid"]
        console = zone.console(u).replace("\r", "")
        m = re.search(pattern, console)
        assert m and m.group(1) == info["hostname"], f"{ds}: hostname not applied: {m and m.group(0)}"
        cloud_id = m.group(2).lower()
        if ds == "CloudStack":
            assert "cloudstack" in cloud_id, f"{ds}: cloud-id {cloud_id!r}"
        else:
            assert "cloudstack" not in cloud_id, f"{ds}: cloud-id {cloud_id!r}"
        keys = wait_for(lambda u=u: re.search(r"NIMBO-KEYS-BEGIN([\s\S]*?)NIMBO-KEYS-END",
                                              zone.console(u).replace("\r", "")), 30, f"keys of {ds}")
        assert KEY in keys.group(1), f"{ds}: key not installed:\n{keys.group(0)}"

    for info in vms.values():
        a.call("DestroyVmInstance", uuid=info["vm"]["uuid"])
