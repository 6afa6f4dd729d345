"""A template captured from a real guest's root volume boots a new VM: a VM of the tiny guest is
stopped, CreateRootVolumeTemplateFromRootVolume makes a flattened qcow2 of its root volume on the
backup storage, and a VM created from that template boots to the tiny guest's NIMBO-BOOT line.
Reuses test_real_vm's zone (this machine as a KVM host, an Sftp backup storage)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from image_fixtures import tiny_image_dir  # noqa: E402, F401  (pytest fixture)
from test_real_vm import Zone, zone  # noqa: E402, F401  (pytest fixture)

pytestmark = pytest.mark.e2e


def test_a_vm_from_a_captured_root_volume_template_boots(zone: Zone) -> None:  # noqa: F811
    a = zone.api
    vm = zone.create("source")
    zone.wait_console(vm["uuid"], r"NIMBO-BOOT", 90)
    a.call("StopVmInstance", uuid=vm["uuid"])
    root = vm["allVolumes"][0]
    img = a.call("CreateRootVolumeTemplateFromRootVolume", name="captured", rootVolumeUuid=root["uuid"])["inventory"]
    assert img["status"] == "Ready" and img["format"] == "qcow2" and img["mediaType"] == "RootVolumeTemplate"
    assert img["platform"] == "Linux" and img["url"] == f"volume://{root['uuid']}"
    (ref,) = img["backupStorageRefs"]
    path = Path(ref["installPath"])
    assert path.is_relative_to(zone.root / "bs")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                                     capture_output=True, text=True).stdout)
    # a standalone copy: no backing file (the image cache and overlays merged in)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert img["size"] == info["virtual-size"] == zone.image["size"]
    assert img["actualSize"] == path.stat().st_size
    # the export on the primary storage is gone
    assert not list((zone.root / "ps").rglob(f"{img['uuid']}*"))

    new = zone.create("from-template", imageUuid=img["uuid"])
    assert new["state"] == "Running"
    new_root = new["allVolumes"][0]["installPath"]
    backing = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", new_root],
                                        check=True, capture_output=True, text=True).stdout)["backing-filename"]
    assert img["uuid"] in backing  # the template's cache on the primary storage, not the original image's
    zone.wait_console(new["uuid"], r"NIMBO-BOOT", 90)

    a.call("DestroyVmInstance", uuid=new["uuid"])
    a.call("DestroyVmInstance", uuid=vm["uuid"])


def _info(path: str | Path) -> dict:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)


def test_data_volumes_from_a_snapshot_and_a_data_volume_template(zone: Zone) -> None:  # noqa: F811
    a = zone.api
    vm = zone.create("snap-source")
    root = vm["allVolumes"][0]
    snap = a.call("CreateVolumeSnapshot", name="s", volumeUuid=root["uuid"])["inventory"]
    # from the snapshot of the running VM's disk: a standalone qcow2 beside it
    vol = a.call("CreateDataVolumeFromVolumeSnapshot", name="from-snap", volumeSnapshotUuid=snap["uuid"])["inventory"]
    info = _info(vol["installPath"])
    assert vol["status"] == "Ready" and "backing-filename" not in info
    assert info["virtual-size"] == vol["size"] == zone.image["size"]
    # its data volume template, and a volume from that on the same storage
    tpl = a.call("CreateDataVolumeTemplateFromVolume", name="dtpl", volumeUuid=vol["uuid"])["inventory"]
    path = Path(tpl["backupStorageRefs"][0]["installPath"])
    assert tpl["mediaType"] == "DataVolumeTemplate" and "backing-filename" not in _info(path)
    assert tpl["actualSize"] == path.stat().st_size and tpl["size"] == vol["size"]
    again = a.call("CreateDataVolumeFromVolumeTemplate", name="from-tpl", imageUuid=tpl["uuid"],
                   primaryStorageUuid=vol["primaryStorageUuid"], hostUuid=zone.host["uuid"])["inventory"]
    assert again["status"] == "Ready" and tpl["uuid"] in _info(again["installPath"])["backing-filename"]
    synced = a.call("SyncImageSize", uuid=tpl["uuid"])["inventory"]
    assert synced["actualSize"] == path.stat().st_size and synced["size"] == tpl["size"]
    a.call("DestroyVmInstance", uuid=vm["uuid"])
