"""What the SSH deployment ships and installs (compute/deploy.py), without a host."""

from __future__ import annotations

import tarfile
from pathlib import Path

from nimbostack.compute import deploy
from nimbostack.wire import VERSION

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
# in the lists for building and testing on this machine, not for running an agent
NOT_FOR_HOSTS = {"libvirt-dev", "pkg-config", "gcc", "python3-dev", "systemd", "chromium", "fonts-wqy-microhei"}


def _listed(name: str) -> set[str]:
    lines = (SCRIPTS / name).read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def test_a_host_gets_every_runtime_package_of_the_scripts_lists() -> None:
    wanted = (_listed("libvirt-packages.txt") | _listed("network-packages.txt")) - NOT_FOR_HOSTS
    assert wanted <= set(deploy.HOST_PACKAGES), wanted - set(deploy.HOST_PACKAGES)


def test_the_release_bundle_is_the_running_package_and_what_it_requires(tmp_path: Path) -> None:
    release, bundle = deploy.release_bundle(tmp_path)
    assert release.startswith(f"{VERSION}-")
    with tarfile.open(bundle) as tar:
        names = set(tar.getnames())
    assert "nimbostack/agent/server.py" in names and "nimbostack/compute/deploy.py" in names
    assert f"nimbostack-{VERSION}.dist-info/METADATA" in names  # the host's agent reports this version
    assert "aiohttp/__init__.py" in names and "cryptography/__init__.py" in names
    assert not [n for n in names if "__pycache__" in n or n.startswith("..") or n.startswith("/")]
    # built once per release: the next deployment reuses the file
    mtime = bundle.stat().st_mtime_ns
    assert deploy.release_bundle(tmp_path) == (release, bundle) and bundle.stat().st_mtime_ns == mtime
