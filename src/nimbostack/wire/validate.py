"""Validation of everything that reaches dnsmasq files, nftables rules or command lines.

Each function returns the value in canonical form or raises ``ValueError`` (the agent answers
AGENT_BAD_COMMAND). Nothing here escapes: values that could carry a newline, quote, ``;`` or
``$()`` are refused, so the renderers can write them verbatim. Pure functions, no imports beyond
the standard library: the management node uses them too (``safe_hostname``)."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Any

_UUID = re.compile(r"[0-9a-f]{32}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_SSH_KEY = re.compile(r"(ssh-|ecdsa-|sk-)[A-Za-z0-9@._-]+ [A-Za-z0-9+/=]+( [^\x00-\x1f\x7f]*)?")

METADATA_IP = "169.254.169.254"


def uuid(value: Any, what: str = "uuid") -> str:
    if not isinstance(value, str) or not _UUID.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a uuid (32 lower-case hex characters)")
    return value


def mac(value: Any, what: str = "mac") -> str:
    v = value.lower() if isinstance(value, str) else value
    if not isinstance(v, str) or not _MAC.fullmatch(v):
        raise ValueError(f"{what} {value!r} is not a MAC address (xx:xx:xx:xx:xx:xx)")
    if int(v[:2], 16) & 1:
        raise ValueError(f"{what} {value!r} is a multicast MAC address")
    return v


def ipv4(value: Any, what: str = "ip") -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} {value!r} is not an IPv4 address")
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an IPv4 address") from None


def netmask(value: Any) -> int:
    """The prefix length of a dotted netmask."""
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{value}").prefixlen
    except (ValueError, TypeError):
        raise ValueError(f"netmask {value!r} is not an IPv4 netmask") from None


def ifname(value: Any, what: str = "interface") -> str:
    if not isinstance(value, str) or not _IFNAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"{what} {value!r} is not a Linux interface name (1-15 of [A-Za-z0-9_.-])")
    return value


def vlan(value: Any) -> int | None:
    if value in (None, "", 0):
        return None
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise ValueError(f"vlan {value!r} is not a number")
    n = int(value)
    if not 1 <= n <= 4094:
        raise ValueError(f"vlan {value!r} must be between 1 and 4094")
    return n


def hostname(value: Any) -> str:
    """A host name: DNS labels separated by dots, 253 characters at most."""
    if not isinstance(value, str) or not value or len(value) > 253:
        raise ValueError(f"hostname {value!r} is not a DNS name")
    if not all(_LABEL.fullmatch(label) for label in value.split(".")):
        raise ValueError(f"hostname {value!r} is not a DNS name (labels of [A-Za-z0-9-], dot separated)")
    return value


def domain(value: Any) -> str | None:
    if value in (None, ""):
        return None
    try:
        return hostname(value)
    except ValueError:
        raise ValueError(f"dnsDomain {value!r} is not a DNS domain name") from None


def ssh_key(value: Any) -> str:
    if not isinstance(value, str) or not _SSH_KEY.fullmatch(value.strip()):
        raise ValueError(f"sshKey {str(value)[:60]!r} is not an OpenSSH public key line")
    return value.strip()


def safe_hostname(name: str, fallback: str) -> str:
    """A VM name made into a DNS label: lower case, other characters become '-', 63 at most."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    if not label or not _LABEL.fullmatch(label):
        label = fallback
    return label


def tap_name(nic_uuid: str) -> str:
    """The tap of a VM NIC, as the libvirt driver names it (``nic_target``): vnic + 8 hex."""
    hex_part = "".join(c for c in nic_uuid.lower() if c in "0123456789abcdef")[:8]
    if not hex_part:
        raise ValueError(f"nicUuid {nic_uuid!r} has no hex digits to name its tap")
    return f"vnic{hex_part}"


def host_mac(*seed: str) -> str:
    """A stable, locally administered unicast MAC derived from ``seed``."""
    h = hashlib.sha256("/".join(seed).encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in h[:5])
