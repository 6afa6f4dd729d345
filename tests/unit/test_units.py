"""The systemd units ``nimbostack install-service`` writes pass ``systemd-analyze verify`` (systemd
is not PID 1 here, so they are checked, not started)."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from nimbostack import units

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze missing: .ci/run installs Debian's systemd package"
)


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)


def test_install_service_writes_units_that_systemd_accepts(tmp_path: Path) -> None:
    unit_dir, env_dir = tmp_path / "units", tmp_path / "etc"
    for which, extra in (("server", ["--db", "postgresql+asyncpg://u:secret@db/nimbo"]), ("agent", [])):
        done = subprocess.run(
            [sys.executable, "-m", "nimbostack.main", "install-service", which, "--unit-dir", str(unit_dir),
             "--env-dir", str(env_dir), "--data-dir", str(tmp_path / "data"), "--state-dir", str(tmp_path / "agent"),
             *extra],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        path = unit_dir / f"nimbostack-{which}.service"
        result = _verify(path)
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    server = (unit_dir / "nimbostack-server.service").read_text()
    assert "Restart=on-failure" in server and "StandardOutput=journal" in server and "User=root" in server
    assert "secret" not in server  # the database URL is in the 0600 environment file, not the unit
    env = env_dir / "server.env"
    assert env.read_text() == "NIMBOSTACK_DB=postgresql+asyncpg://u:secret@db/nimbo\n"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
    agent = (unit_dir / "nimbostack-agent.service").read_text()
    assert "KillMode=process" in agent and "libvirtd.service" in agent


def test_the_check_would_catch_a_broken_unit(tmp_path: Path) -> None:
    unit = units.agent_unit(tmp_path, 7070, "127.0.0.1")
    path = tmp_path / unit.name
    path.write_text(unit.text.replace("ExecStart=", "ExecStart=/nonexistent/nimbostack-gone ").replace(
        "Restart=on-failure", "Restart=sometimes"))
    assert _verify(path).returncode != 0
