"""scripts/install on this machine, below a scratch directory and into a database of its own: the
venv, the database role and its 0600 config, a unit systemd-analyze accepts, the node started by
hand from the venv logging in with the printed password; then ``-u`` from a newer copy of the
source: a pg_dump backup, the schema migrated, the new version running on the same data."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nimbostack.db.engine import known_revisions
from nimbostack.harness import Api, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the installer runs as root (packages, a database role, units)"),
    pytest.mark.skipif(shutil.which("pg_ctlcluster") is None,
                       reason="needs Debian's PostgreSQL (scripts/install-packages.txt)"),
    pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                       reason="needs systemd-analyze to verify the unit (scripts/install-packages.txt)"),
]


def psql(sql: str, db: str = "postgres") -> str:
    done = subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-v", "ON_ERROR_STOP=1", "-d", db, "-qAtc", sql],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def install(*args: str, script: Path = INSTALL, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(script), *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=600)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


class Node:
    """``nimbostack server`` from the installed venv, with the unit's environment file, by hand
    (systemd does not run this machine)."""

    def __init__(self, venv: Path, data: Path, env_file: Path) -> None:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the venv's own copy of nimbostack, not this checkout's
        for line in env_file.read_text().splitlines():
            key, _, value = line.partition("=")
            env[key] = value
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(venv / "bin" / "nimbostack"), "server", "--data-dir", str(data), "--port", str(self.port),
             "--wire-port", str(free_port()), "--listen", "127.0.0.1"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for(self._up, 60, "the installed node to serve")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the installed node exited: {self.proc.stdout.read() if self.proc.stdout else ''}")
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


@pytest.fixture
def names() -> Iterator[str]:
    """A database and role name of this test's own, dropped afterwards."""
    name = f"nimbo_inst_{uuid.uuid4().hex[:8]}"
    yield name
    psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    psql(f"DROP ROLE IF EXISTS {name}")


def newer_source(tmp: Path, version: str) -> Path:
    """A copy of this checkout whose package says ``version``: the release -u upgrades to."""
    out = tmp / "newer"
    shutil.copytree(REPO / "src", out / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (out / "scripts").mkdir()
    shutil.copy2(INSTALL, out / "scripts" / "install")
    text = (REPO / "pyproject.toml").read_text()
    (out / "pyproject.toml").write_text(re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', text, count=1))
    return out


def test_install_then_upgrade_in_place(tmp_path: Path, names: str) -> None:
    root = tmp_path / "root"
    prefix, data, etc, units = root / "opt", root / "data", root / "etc", root / "units"
    where = ["--prefix", str(prefix), "--data-dir", str(data), "--config-dir", str(etc), "--unit-dir", str(units),
             "--db-name", names, "--db-user", names, "--port", "18080"]
    done = install(*where)
    (password,) = re.findall(r"admin password \(shown this once\): (\S+)", done.stdout)
    assert len(password) >= 16

    # the role's random password is in the 0600 environment file the unit reads, and it is the role's
    env_file = etc / "server.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    (url,) = re.findall(r"^NIMBOSTACK_DB=(postgresql\+asyncpg://\S+)$", env_file.read_text(), re.M)
    assert f"//{names}:" in url and url.endswith(f"/{names}")
    assert password not in env_file.read_text()
    assert psql(f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{names}'") == names
    unit = units / "nimbostack-server.service"
    assert f"ExecStart={prefix}/venv/bin/nimbostack server --data-dir {data} --port 18080" in unit.read_text()
    assert f"EnvironmentFile=-{env_file}" in unit.read_text()
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr

    # a second install over it is refused, and changes nothing
    again = install(*where, check=False)
    assert again.returncode != 0 and "upgrade it with -u" in again.stderr
    assert env_file.read_text().endswith(f"{url}\n")

    node = Node(prefix / "venv", data, env_file)
    try:
        api = Api(node.url)
        assert api.fails("LogInByAccount", accountName="admin",
                         password=hashlib.sha512(b"password").hexdigest())["code"] == "ID.1004"
        api.login("admin", password)
        zone = api.call("CreateZone", name="before-upgrade")["inventory"]
        assert api.call("GetVersion")["version"] == "0.1.0"
        # -u under the node it would replace is refused before it installs anything
        refused = install("-u", "--config-dir", str(etc), check=False)
        assert refused.returncode != 0 and "still runs" in refused.stderr, refused.stderr
        assert api.query("QueryZone", ("uuid", "=", zone["uuid"]))
    finally:
        node.stop()

    # the installation is of an older release: its schema one revision behind this one's
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c",
                    "import sys; from alembic import command; from nimbostack.db.engine import alembic_config; "
                    "command.downgrade(alembic_config(sys.argv[1]), '-1')", url], check=True, env=env)
    known, head = known_revisions()
    behind = psql("SELECT version_num FROM alembic_version", names)
    assert behind != head and behind in known

    newer = newer_source(tmp_path, "0.1.1")
    done = install("-u", "--config-dir", str(etc), script=newer / "scripts" / "install")
    assert "nimbostack 0.1.0 -> 0.1.1" in done.stdout, done.stdout
    assert f"upgraded the schema from {behind} to {head}" in done.stdout, done.stdout
    assert psql("SELECT version_num FROM alembic_version", names) == head
    (dump,) = (data / "db-backups").glob("nimbostack-pre-upgrade-*.dump")
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600
    listed = subprocess.run(["pg_restore", "--list", str(dump)], capture_output=True, text=True, check=True)
    assert "TABLE public zone" in listed.stdout

    node = Node(prefix / "venv", data, env_file)
    try:
        api = Api(node.url)
        api.login("admin", password)  # the same password, the same data, the new version
        assert [z["uuid"] for z in api.query("QueryZone", ("name", "=", "before-upgrade"))] == [zone["uuid"]]
        assert api.call("GetVersion")["version"] == "0.1.1"
        api.call("CreateZone", name="after-upgrade")
    finally:
        node.stop()

    # a database newer than the checkout -u runs from (a downgrade): refused, the venv left as it was
    psql("UPDATE alembic_version SET version_num = '9999_newer'", names)
    refused = install("-u", "--config-dir", str(etc), check=False)
    assert refused.returncode != 0 and "newer than this nimbostack" in refused.stderr, refused.stderr
    assert "nothing was changed" in refused.stderr
    installed = subprocess.run([str(prefix / "venv" / "bin" / "python"), "-c",
                                "from importlib.metadata import version; print(version('nimbostack'))"],
                               capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]})
    assert installed.stdout.strip() == "0.1.1"

    missing = install("-u", "--config-dir", str(tmp_path / "nowhere"), check=False)
    assert missing.returncode != 0 and "no installation recorded" in missing.stderr
