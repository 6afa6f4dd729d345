"""Small pure pieces of volume migration: agent path maps, the file order of a volume's chain,
the domain owner in libvirt XML, the agent's byte sizes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nimbostack.agent.drivers.libvirt.domain_xml import build_domain_xml, set_domain_owner
from nimbostack.agent.host import Agent
from nimbostack.agent.storage import LocalStorage
from nimbostack.main import _bytes, _path_map
from nimbostack.plugins.local_storage.migration import _files
from nimbostack.wire import VmSpec, pki


def _agent(path_map: list[tuple[str, str]], tmp: Path) -> Agent:
    creds = pki.agent_bundle(pki.Authority(tmp / "pki"), tmp / "agent.pem", "127.0.0.1:1", ["127.0.0.1"])
    return Agent(lambda h, b: None, LocalStorage(simulate=True), False, creds, path_map=path_map)  # type: ignore


def test_path_map_is_a_bind_mount_both_ways(tmp_path: Path) -> None:
    a = _agent([("/ps", "/srv/h2/ps"), ("/ps/special/", "/fast")], tmp_path)
    assert a.real("/ps/rootVolumes/x.qcow2") == "/srv/h2/ps/rootVolumes/x.qcow2"
    assert a.real("/ps") == "/srv/h2/ps"
    assert a.real("/ps/special/y") == "/fast/y"  # the longest prefix wins
    assert a.real("/psx/y") == "/psx/y" and a.real("/smp/z") == "/smp/z"  # whole components only
    assert a.logical("/srv/h2/ps/imagecache/i.img") == "/ps/imagecache/i.img"
    assert a.logical("/fast/y") == "/ps/special/y"
    assert _agent([], tmp_path).real("/ps/a") == "/ps/a"


def test_agent_options() -> None:
    assert _path_map(["/a=/b"]) == [("/a", "/b")]
    with pytest.raises(SystemExit):
        _path_map(["a=/b"])
    assert _bytes("0") == 0 and _bytes("100M") == 100 << 20
    assert _bytes("2GiB") == 2 << 30 and _bytes("512k") == 512 << 10


def _snap(uuid: str, parent: str | None, latest: bool = False) -> Any:
    return SimpleNamespace(uuid=uuid, parentUuid=parent, primaryStorageInstallPath=f"/ps/v/{uuid}.qcow2", latest=latest)


def test_a_volume_chain_is_copied_parents_first_with_its_backing() -> None:
    vol = SimpleNamespace(installPath="/ps/v/top.qcow2")
    # s1 <- s2 <- top, and a branch s1 <- s3 left by a revert; listed in any order
    snaps = [_snap("s3", "s1"), _snap("s2", "s1", latest=True), _snap("s1", None)]
    files = _files(vol, snaps, "/ps/imagecache/img.img")  # type: ignore[arg-type]
    paths = [f["installPath"] for f in files]
    assert paths[0] == "/ps/imagecache/img.img" and files[0]["skipIfExists"]
    assert paths.index("/ps/v/s1.qcow2") < paths.index("/ps/v/s2.qcow2") < paths.index("/ps/v/top.qcow2")
    assert paths.index("/ps/v/s1.qcow2") < paths.index("/ps/v/s3.qcow2")
    backing = {f["installPath"]: f.get("backing") for f in files}
    assert backing["/ps/v/s1.qcow2"] == "/ps/imagecache/img.img"
    assert backing["/ps/v/s3.qcow2"] == backing["/ps/v/s2.qcow2"] == "/ps/v/s1.qcow2"
    assert backing["/ps/v/top.qcow2"] == "/ps/v/s2.qcow2"
    # a data volume without snapshots: one file, backed by nothing
    assert _files(vol, [], None) == [{"installPath": "/ps/v/top.qcow2", "backing": None}]  # type: ignore[arg-type]


def test_migration_rewrites_the_domain_owner() -> None:
    spec = VmSpec(uuid="0" * 31 + "1", name="v", cpu_num=1, memory=64 << 20, disks=[], nics=[])
    xml = build_domain_xml(spec, "qemu", owner="host-a")
    assert "host-a" in xml
    moved = set_domain_owner(xml, "host-b")
    assert "host-b" in moved and "host-a" not in moved
    assert "host-c" in set_domain_owner(build_domain_xml(spec, "qemu"), "host-c")
