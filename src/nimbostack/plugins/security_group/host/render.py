"""From a ``/sg/apply`` body to an nftables file.

``parse`` validates every field (``ValueError`` otherwise) and keeps only normalised values: CIDRs
as ``ipaddress`` prints them, ports as ints, protocols from a fixed set, chain names derived from
NIC uuids. The ``render_*`` functions write nothing else, so no string a tenant typed can reach
the nft file.

One ``bridge`` table per host (the family of the Flat anti-spoofing tables), with a chain per
NIC and direction, reached through two verdict maps keyed by the NIC's tap:

* ``in_<tap>`` (frames towards the guest): ARP and DHCP replies pass, then what the NIC's
  ingress rules allow; anything else is dropped (a NIC in a group is default-deny ingress).
* ``out_<tap>`` (frames from the guest): DHCP and the metadata service always pass; when the
  NIC's groups have egress rules only those pass, otherwise everything does.

Chains end in ``return`` rather than ``accept`` so that a frame between two guests on one host
meets both the sender's egress chain and the receiver's ingress chain.

Replies: with conntrack in the bridge family (``nf_conntrack_bridge``) established traffic passes
by its state. Kernels without it get a stateless rule set: TCP segments other than a bare SYN
(replies and the rest of a connection whose SYN passed) and ICMP error/echo replies pass, so a
connection opened in an allowed direction works; UDP replies need a rule of their own."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from nimbostack.wire import validate as v

PROTOCOLS = ("TCP", "UDP", "ICMP", "ALL")
MAX_RULES = 4096  # per NIC and direction: far above any real group set, bounds the file
WORLD = "0.0.0.0/0"
TABLE = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass(frozen=True)
class Rule:
    protocol: str
    start: int
    end: int
    cidr: str

    def match(self, direction: str) -> str:
        """The rule's match; ``direction`` is ``saddr`` (ingress) or ``daddr`` (egress)."""
        parts = [] if self.cidr == WORLD else [f"ip {direction} {self.cidr}"]
        if self.protocol in ("TCP", "UDP"):
            ports = str(self.start) if self.start == self.end else f"{self.start}-{self.end}"
            parts.append(f"{self.protocol.lower()} dport {ports}")
        elif self.protocol == "ICMP":
            if self.start == -1:
                parts.append("ip protocol icmp")
            else:
                parts.append(f"icmp type {self.start}")
                if self.end != -1:
                    parts.append(f"icmp code {self.end}")
        elif not parts:
            parts.append("ether type ip")
        return " ".join(parts)


@dataclass(frozen=True)
class Nic:
    nic_uuid: str
    vm_uuid: str
    ingress: tuple[Rule, ...]
    egress: tuple[Rule, ...]

    @property
    def tap(self) -> str:
        return v.tap_name(self.nic_uuid)


@dataclass(frozen=True)
class Apply:
    host_uuid: str
    full: bool  # replace the whole table (host connect) rather than change the NICs named
    vm_uuids: tuple[str, ...]  # VMs whose every NIC is among nics/remove (their other chains go)
    nics: tuple[Nic, ...]
    remove: tuple[str, ...]  # taps whose chains go


def parse_rule(raw: Any, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object")
    protocol = raw.get("protocol")
    if protocol not in PROTOCOLS:
        raise ValueError(f"{where}.protocol must be one of {', '.join(PROTOCOLS)}")
    start, end = raw.get("startPort"), raw.get("endPort")
    if not isinstance(start, int) or not isinstance(end, int) or isinstance(start, bool) or isinstance(end, bool):
        raise ValueError(f"{where}: startPort and endPort must be integers")
    if protocol in ("TCP", "UDP") and not 0 <= start <= end <= 65535:
        raise ValueError(f"{where}: {protocol} ports must satisfy 0 <= startPort <= endPort <= 65535")
    if protocol == "ICMP" and not (-1 <= start <= 255 and -1 <= end <= 255 and (start != -1 or end == -1)):
        raise ValueError(f"{where}: ICMP type and code must be -1 (any) or 0-255, and a code needs a type")
    if protocol == "ALL" and (start, end) != (-1, -1):
        raise ValueError(f"{where}: protocol ALL takes no ports (-1)")
    cidr = raw.get("allowedCidr")
    if not isinstance(cidr, str) or len(cidr) > 18:
        raise ValueError(f"{where}.allowedCidr must be an IPv4 CIDR")
    try:
        net = ipaddress.IPv4Network(cidr, strict=False)
    except ValueError:
        raise ValueError(f"{where}.allowedCidr must be an IPv4 CIDR") from None
    return Rule(str(protocol), start, end, str(net))


def _rules(raw: Any, where: str) -> tuple[Rule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_RULES:
        raise ValueError(f"{where} must be a list of at most {MAX_RULES} rules")
    # the same rule from two groups is one line
    return tuple(dict.fromkeys(parse_rule(r, f"{where}[{i}]") for i, r in enumerate(raw)))


def parse(body: Any) -> Apply:
    if not isinstance(body, dict):
        raise ValueError("the body must be an object")
    host_uuid = body.get("hostUuid")
    if not isinstance(host_uuid, str) or not host_uuid.isalnum() or len(host_uuid) > 64:
        raise ValueError("hostUuid is not valid")
    nics_raw = body.get("nics") or []
    if not isinstance(nics_raw, list):
        raise ValueError("nics must be a list")
    nics: list[Nic] = []
    taps: set[str] = set()
    for i, e in enumerate(nics_raw):
        if not isinstance(e, dict):
            raise ValueError(f"nics[{i}] must be an object")
        nic = Nic(
            nic_uuid=v.uuid(e.get("nicUuid"), f"nics[{i}].nicUuid"),
            vm_uuid=v.uuid(e.get("vmUuid"), f"nics[{i}].vmUuid"),
            ingress=_rules(e.get("ingress"), f"nics[{i}].ingress"),
            egress=_rules(e.get("egress"), f"nics[{i}].egress"),
        )
        if nic.tap in taps:
            raise ValueError(f"nics[{i}]: tap {nic.tap} is named twice")
        taps.add(nic.tap)
        nics.append(nic)
    remove_raw = body.get("remove") or []
    vms_raw = body.get("vmUuids") or []
    if not isinstance(remove_raw, list) or not isinstance(vms_raw, list):
        raise ValueError("remove and vmUuids must be lists")
    remove = tuple(v.tap_name(v.uuid(u, "remove")) for u in remove_raw)
    return Apply(
        host_uuid=host_uuid,
        full=bool(body.get("full", False)),
        vm_uuids=tuple(v.uuid(u, "vmUuids") for u in vms_raw),
        nics=tuple(nics),
        remove=tuple(t for t in dict.fromkeys(remove) if t not in taps),
    )


# --- nftables --------------------------------------------------------------------------------


def _reply_lines(stateful: bool) -> list[str]:
    if stateful:
        return ["ct state established,related return", "ct state invalid drop"]
    return [
        "tcp flags & (syn | ack) != syn return",
        "icmp type { echo-reply, destination-unreachable, time-exceeded, parameter-problem } return",
    ]


def chain_rules(nic: Nic, direction: str, stateful: bool) -> list[str]:
    """The rules of one NIC's ``in`` or ``out`` chain."""
    lines = ["ether type arp return", *_reply_lines(stateful)]
    if direction == "in":
        lines.append("udp sport 67 udp dport 68 return")
        lines += [f"{r.match('saddr')} return" for r in nic.ingress]
        lines.append("drop")
        return lines
    lines.append("udp sport 68 udp dport 67 return")
    lines.append(f"ip daddr {v.METADATA_IP} tcp dport 80 return")
    if nic.egress:
        lines += [f"{r.match('daddr')} return" for r in nic.egress]
        lines.append("drop")
    else:
        lines = ["return"]  # no egress rule: the guest may send anything
    return lines


def _base(family_table: str) -> list[str]:
    """Statements that make the table, its maps and hooked chains exist (idempotent)."""
    t = family_table
    return [
        f"add table {t}",
        f"add map {t} ingress {{ type ifname : verdict; }}",
        f"add map {t} egress {{ type ifname : verdict; }}",
        f"add chain {t} forward {{ type filter hook forward priority 0; policy accept; }}",
        f"add chain {t} input {{ type filter hook input priority 0; policy accept; }}",
        f"add chain {t} output {{ type filter hook output priority 0; policy accept; }}",
        f"flush chain {t} forward",
        f"flush chain {t} input",
        f"flush chain {t} output",
        # towards a guest: the bridge forwarding it (other guests, the uplink) or the host itself
        f"add rule {t} forward iifname vmap @egress",
        f"add rule {t} forward oifname vmap @ingress",
        f"add rule {t} output oifname vmap @ingress",
        f"add rule {t} input iifname vmap @egress",
    ]


def _upsert(t: str, nic: Nic, stateful: bool) -> list[str]:
    out = []
    for direction, map_name in (("in", "ingress"), ("out", "egress")):
        chain = f"{direction}_{nic.tap}"
        out += [f"add chain {t} {chain}", f"flush chain {t} {chain}"]
        out += [f"add rule {t} {chain} {line}" for line in chain_rules(nic, direction, stateful)]
        out.append(f'add element {t} {map_name} {{ "{nic.tap}" : jump {chain} }}')
    return out


def _drop(t: str, tap: str) -> list[str]:
    out = []
    for direction, map_name in (("in", "ingress"), ("out", "egress")):
        chain = f"{direction}_{tap}"
        # made to exist first, so that the deletes succeed whatever the table holds
        out += [
            f"add chain {t} {chain}",
            f'add element {t} {map_name} {{ "{tap}" : jump {chain} }}',
            f'delete element {t} {map_name} {{ "{tap}" }}',
            f"flush chain {t} {chain}",
            f"delete chain {t} {chain}",
        ]
    return out


def render(table: str, nics: tuple[Nic, ...], remove: tuple[str, ...], full: bool, stateful: bool) -> str:
    """One nft transaction: ``full`` replaces the table with exactly ``nics`` (none: no table);
    otherwise the ``nics`` chains are (re)written and the ``remove`` taps' chains deleted, the rest untouched."""
    if not TABLE.fullmatch(table):
        raise ValueError(f"table {table!r} must be [a-z][a-z0-9_]*, at most 32 characters")
    t = f"bridge {table}"
    lines: list[str] = []
    if full:
        lines += [f"add table {t}", f"delete table {t}"]
        if not nics:  # a host without filtered NICs keeps no table (nor hooks) at all
            return "\n".join(lines) + "\n"
    lines += _base(t)
    for nic in nics:
        lines += _upsert(t, nic, stateful)
    if not full:
        for tap in remove:
            lines += _drop(t, tap)
    return "\n".join(lines) + "\n"
