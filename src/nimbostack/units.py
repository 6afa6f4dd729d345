"""systemd units for the management node and the host agent (``nimbostack install-service``)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

UNIT_DIR = Path("/etc/systemd/system")
ENV_DIR = Path("/etc/nimbostack")


@dataclass(frozen=True)
class Unit:
    name: str  # nimbostack-server.service
    text: str
    env_file: Path | None = None
    env: str = ""  # the environment file's content: secrets kept out of the unit (systemctl show prints it)


def executable() -> list[str]:
    """How systemd starts this installation: its own console script, else its Python with -m."""
    script = Path(sys.executable).with_name("nimbostack")
    return [str(script)] if script.exists() else [sys.executable, "-m", "nimbostack.main"]


def _unit_text(description: str, after: str, wants: str, service: str, identifier: str) -> str:
    """A unit of ours: what the two have in common around the lines of its own ``[Service]``."""
    return f"""[Unit]
Description={description}
After={after}
Wants={wants}

[Service]
Type=simple
Environment=PYTHONUNBUFFERED=1
{service.strip()}
Restart=on-failure
RestartSec=5
LimitNOFILE=65536
StandardOutput=journal
StandardError=journal
SyslogIdentifier={identifier}

[Install]
WantedBy=multi-user.target
"""


def server_unit(data_dir: Path, port: int, db_url: str | None = None, user: str = "root",
                env_dir: Path = ENV_DIR) -> Unit:
    env_file = env_dir / "server.env"
    argv = [*executable(), "server", "--data-dir", str(data_dir), "--port", str(port)]
    text = _unit_text("nimbostack management node", "network-online.target postgresql.service",
                      "network-online.target", f"""
User={user}
EnvironmentFile=-{env_file}
ExecStart={shlex.join(argv)}
WorkingDirectory={data_dir}
# the data dir holds the database (account hashes, session keys): the node's alone
UMask=0077
TimeoutStopSec=30
""", "nimbostack-server")
    return Unit("nimbostack-server.service", text, env_file, f"NIMBOSTACK_DB={db_url}\n" if db_url else "")


def agent_unit(state_dir: Path, port: int, host_ip: str, driver: str = "libvirt") -> Unit:
    argv = [*executable(), "agent", "--driver", driver, "--port", str(port), "--host-ip", host_ip,
            "--state-dir", str(state_dir)]
    text = _unit_text("nimbostack host agent", "network-online.target libvirtd.service",
                      "network-online.target libvirtd.service", f"""
# network namespaces, bridges, nftables and libvirt: the agent runs as root
User=root
ExecStart={shlex.join(argv)}
WorkingDirectory={state_dir}
# a restart of the agent must not take the hosts' DHCP and metadata services (its children) down
# with it: the agent adopts them again when it starts
KillMode=process
""", "nimbostack-agent")
    return Unit("nimbostack-agent.service", text)


def install(unit: Unit, unit_dir: Path = UNIT_DIR, enable: bool = True) -> list[str]:
    """Write the unit (and its environment file, 0600) and enable and start it when systemd runs
    this machine; what was done, a line each."""
    done = []
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / unit.name
    path.write_text(unit.text)
    done.append(f"wrote {path}")
    if unit.env_file is not None and unit.env:
        unit.env_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(unit.env_file, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(unit.env)
        done.append(f"wrote {unit.env_file} (0600)")
    if not enable:
        return done
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        done.append(f"systemd does not run this machine: start it with 'systemctl enable --now {unit.name}' "
                    "where it does")
        return done
    for argv in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", unit.name]):
        subprocess.run(argv, check=True)
        done.append(" ".join(argv))
    return done
