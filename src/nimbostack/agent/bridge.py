"""Linux bridges for L2 networks: created on demand on the host, with the L2's physical
interface (or its VLAN sub-interface) enslaved when it exists and carries no host address."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from nimbostack.agent.driver import DriverError

log = logging.getLogger(__name__)
SYS = Path("/sys/class/net")


async def run(argv: list[str], ok_if: str = "") -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    text = err.decode(errors="replace").strip()
    if proc.returncode != 0 and not (ok_if and ok_if in text):
        raise DriverError("NETWORK_ERROR", f"{' '.join(argv[:3])} failed", text)
    return out.decode()


def uplink_name(physical_interface: str, vlan: int | None) -> str:
    return f"{physical_interface}.{vlan}"[:15] if vlan else physical_interface


async def _has_ipv4(ip: str, dev: str) -> bool:
    return "inet " in await run([ip, "-4", "addr", "show", "dev", dev])


def _master(dev: str) -> str | None:
    link = SYS / dev / "master"
    return link.resolve().name if link.exists() else None


async def ensure_bridge(bridge: str, physical_interface: str = "", vlan: int | None = None) -> list[str]:
    """Make ``bridge`` exist and be up; return warnings an operator should read."""
    ip = shutil.which("ip") or "/sbin/ip"
    warnings: list[str] = []
    br = SYS / bridge
    if not (br / "bridge").is_dir():
        if br.exists():
            raise DriverError("NETWORK_ERROR", f"{bridge} exists on this host but is not a bridge", bridge)
        await run([ip, "link", "add", "name", bridge, "type", "bridge"], ok_if="File exists")
    await run([ip, "link", "set", "dev", bridge, "up"])
    if not physical_interface:
        return warnings
    if not (SYS / physical_interface).exists():
        warnings.append(f"physical interface {physical_interface} does not exist; {bridge} stays host-local")
        return warnings
    up = uplink_name(physical_interface, vlan)
    if vlan and not (SYS / up).exists():
        await run(
            [ip, "link", "add", "link", physical_interface, "name", up, "type", "vlan", "id", str(vlan)],
            ok_if="File exists",
        )
    if _master(up) == bridge:
        return warnings
    if await _has_ipv4(ip, up):
        # enslaving would cut the host's own traffic on it; moving addresses is the operator's call
        warnings.append(f"{up} carries IPv4 addresses; not enslaved to {bridge}")
        return warnings
    await run([ip, "link", "set", "dev", up, "master", bridge])
    await run([ip, "link", "set", "dev", up, "up"])
    return warnings
