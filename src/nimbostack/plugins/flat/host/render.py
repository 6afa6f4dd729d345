"""From a ``/flat/apply`` body to the files and rules of one L3 network on one host.

``parse`` validates the whole body (``ValueError`` on anything malformed); the ``render_*``
functions are pure and only ever write values ``parse`` has validated, so no field of a VM or a
tag can add a line to a dnsmasq file or a rule to nftables."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from nimbostack.wire import validate as v

DEFAULT_TAG = "nimbodef"  # dnsmasq tag of NICs on their VM's default L3 network (they get the router)
LEASE = "infinite"
MAX_USERDATA = 1 << 20
SERVICES = ("DHCP", "Userdata")  # what Flat provides on an L3 network that the agent acts on


@dataclass(frozen=True)
class L3Conf:
    uuid: str
    bridge: str
    physical_interface: str | None
    vlan: int | None
    dhcp_ip: str
    netmask: str
    prefix: int
    gateway: str | None
    dns: tuple[str, ...]
    domain: str | None
    services: frozenset[str] = frozenset(SERVICES)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.dhcp_ip}/{self.prefix}", strict=False)

    @property
    def uplink(self) -> str | None:
        """The bridge port towards other hosts: the physical interface or its VLAN sub-interface."""
        if not self.physical_interface:
            return None
        return f"{self.physical_interface}.{self.vlan}" if self.vlan else self.physical_interface


@dataclass(frozen=True)
class VmEntry:
    vm_uuid: str
    nic_uuid: str
    mac: str
    ip: str
    hostname: str
    is_default: bool
    userdata: str | None
    ssh_keys: tuple[str, ...]
    public_ip: str | None = None
    zone: str | None = None

    @property
    def tap(self) -> str:
        return v.tap_name(self.nic_uuid)

    @property
    def label(self) -> str:
        """The first label of the host name: what DHCP option 12 carries."""
        return self.hostname.split(".", 1)[0]


@dataclass(frozen=True)
class Desired:
    host_uuid: str
    l3: L3Conf
    vms: tuple[VmEntry, ...] = field(default_factory=tuple)


def _opt_str(value: Any, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    return value


def parse(body: dict[str, Any]) -> Desired:
    if not isinstance(body, dict):
        raise ValueError("the body must be an object")
    host_uuid = body.get("hostUuid")
    if not isinstance(host_uuid, str) or not host_uuid or len(host_uuid) > 64 or not host_uuid.isalnum():
        raise ValueError(f"hostUuid {host_uuid!r} is not valid")
    raw = body["l3"]
    if not isinstance(raw, dict):
        raise ValueError("l3 must be an object")
    phys = _opt_str(raw.get("physicalInterface"), "physicalInterface")
    dns = raw.get("dns") or []
    if not isinstance(dns, list) or len(dns) > 8:
        raise ValueError("dns must be a list of at most 8 IPv4 addresses")
    services = raw.get("services", list(SERVICES))
    if not isinstance(services, list) or not set(services) <= set(SERVICES) | {"Eip"}:
        raise ValueError(f"l3.services must be a list of {', '.join(SERVICES)}")
    gateway = _opt_str(raw.get("gateway"), "gateway")
    nm = _opt_str(raw.get("netmask"), "netmask") or ""
    l3 = L3Conf(
        uuid=v.uuid(raw.get("uuid"), "l3.uuid"),
        bridge=v.ifname(raw.get("bridge"), "bridge"),
        physical_interface=v.ifname(phys, "physicalInterface") if phys else None,
        vlan=v.vlan(raw.get("vlan")),
        dhcp_ip=v.ipv4(raw.get("dhcpServerIp"), "dhcpServerIp"),
        netmask=str(ipaddress.IPv4Network(f"0.0.0.0/{v.netmask(nm)}").netmask),
        prefix=v.netmask(nm),
        gateway=v.ipv4(gateway, "gateway") if gateway else None,
        dns=tuple(v.ipv4(d, "dns") for d in dns),
        domain=v.domain(raw.get("dnsDomain")),
        services=frozenset(str(x) for x in services),
    )
    if l3.prefix > 30:
        raise ValueError(f"netmask {l3.netmask} leaves no room for hosts")
    if l3.uplink:
        v.ifname(l3.uplink, "VLAN sub-interface")
    net = l3.network
    if l3.gateway and ipaddress.IPv4Address(l3.gateway) not in net:
        raise ValueError(f"gateway {l3.gateway} is outside {net}")
    vms_raw = body.get("vms") or []
    if not isinstance(vms_raw, list):
        raise ValueError("vms must be a list")
    vms: list[VmEntry] = []
    seen: dict[str, set[str]] = {"mac": set(), "ip": {l3.dhcp_ip}, "tap": set()}
    for i, e in enumerate(vms_raw):
        if not isinstance(e, dict):
            raise ValueError(f"vms[{i}] must be an object")
        userdata = e.get("userdata")
        if userdata is not None and (not isinstance(userdata, str) or len(userdata) > MAX_USERDATA):
            raise ValueError(f"vms[{i}].userdata must be a string of at most {MAX_USERDATA} characters")
        keys = e.get("sshKeys") or []
        if not isinstance(keys, list) or len(keys) > 32:
            raise ValueError(f"vms[{i}].sshKeys must be a list of at most 32 keys")
        public_ip = _opt_str(e.get("publicIp"), "publicIp")
        zone = _opt_str(e.get("zoneUuid"), "zoneUuid")
        entry = VmEntry(
            vm_uuid=v.uuid(e.get("vmUuid"), f"vms[{i}].vmUuid"),
            nic_uuid=v.uuid(e.get("nicUuid"), f"vms[{i}].nicUuid"),
            mac=v.mac(e.get("mac"), f"vms[{i}].mac"),
            ip=v.ipv4(e.get("ip"), f"vms[{i}].ip"),
            hostname=v.hostname(e.get("hostname")),
            is_default=bool(e.get("isDefault", True)),
            userdata=userdata if userdata else None,
            ssh_keys=tuple(v.ssh_key(k) for k in keys),
            public_ip=v.ipv4(public_ip, "publicIp") if public_ip else None,
            zone=v.uuid(zone, "zoneUuid") if zone else None,
        )
        if ipaddress.IPv4Address(entry.ip) not in net:
            raise ValueError(f"vms[{i}].ip {entry.ip} is outside {net}")
        for kind, value in (("mac", entry.mac), ("ip", entry.ip), ("tap", entry.tap)):
            if value in seen[kind]:
                raise ValueError(f"vms[{i}]: {kind} {value} is used twice on L3 network {l3.uuid}")
            seen[kind].add(value)
        vms.append(entry)
    return Desired(host_uuid=host_uuid, l3=l3, vms=tuple(vms))


# --- dnsmasq -------------------------------------------------------------------------------


def _path(p: str) -> str:
    if any(c in p for c in "\n\r\0,"):
        raise ValueError(f"path {p!r} cannot be written to a dnsmasq configuration")
    return p


def render_dnsmasq_conf(l3: L3Conf, inner: str, hosts_file: str, pid_file: str, user: str, group: str) -> str:
    net = l3.network
    lines = [
        f"# nimbostack Flat DHCP of L3 network {l3.uuid}: static leases only, no DNS service",
        "port=0",
        "no-resolv",
        "no-hosts",
        "no-poll",
        "bind-interfaces",
        f"interface={v.ifname(inner)}",
        "except-interface=lo",
        f"user={user}",
        f"group={group}",
        f"pid-file={_path(pid_file)}",
        "leasefile-ro",
        "dhcp-authoritative",
        "log-facility=-",
        f"dhcp-range=set:nimbo,{net.network_address},static,{l3.netmask},{LEASE}",
        f"dhcp-hostsfile={_path(hosts_file)}",
    ]
    if l3.gateway:
        lines.append(f"dhcp-option=tag:{DEFAULT_TAG},option:router,{l3.gateway}")
        lines.append(f"dhcp-option=tag:!{DEFAULT_TAG},option:router")
    else:
        lines.append("dhcp-option=option:router")
    if "Userdata" in l3.services:
        # RFC 3442 route to 169.254.169.254 via this host's DHCP address: EC2-style metadata then
        # works on networks whose gateway does not exist (or is not ours). A client that takes
        # option 121 ignores option 3, so the default NIC gets its default route here too.
        md = f"{v.METADATA_IP}/32,{l3.dhcp_ip}"
        if l3.gateway:
            lines.append(f"dhcp-option=tag:{DEFAULT_TAG},option:classless-static-route,{md},0.0.0.0/0,{l3.gateway}")
            lines.append(f"dhcp-option=tag:!{DEFAULT_TAG},option:classless-static-route,{md}")
        else:
            lines.append(f"dhcp-option=option:classless-static-route,{md}")
    if l3.dns:
        lines.append("dhcp-option=option:dns-server," + ",".join(l3.dns))
    if l3.domain:
        lines.append(f"dhcp-option=option:domain-name,{l3.domain}")
    return "\n".join(lines) + "\n"


def render_dhcp_hosts(vms: tuple[VmEntry, ...]) -> str:
    """``dhcp-hostsfile`` lines: mac,[set:default,]ip,hostname,lease."""
    out = []
    for e in vms:
        tag = f"set:{DEFAULT_TAG}," if e.is_default else ""
        out.append(f"{e.mac},{tag}{e.ip},{e.label},{LEASE}")
    return "".join(line + "\n" for line in out)


# --- metadata ------------------------------------------------------------------------------


def metadata_state(d: Desired) -> dict[str, Any]:
    return {
        "l3Uuid": d.l3.uuid,
        "dhcpServerIp": d.l3.dhcp_ip,
        "vms": {
            e.ip: {
                "vmUuid": e.vm_uuid,
                "nicUuid": e.nic_uuid,
                "mac": e.mac,
                "ip": e.ip,
                "hostname": e.hostname,
                "userdata": e.userdata,
                "sshKeys": list(e.ssh_keys),
                "publicIp": e.public_ip,
                "zoneUuid": e.zone,
            }
            for e in d.vms
        },
    }


# --- nftables ------------------------------------------------------------------------------


def render_nft(table: str, d: Desired, outer: str, ns_mac: str) -> str:
    """One ``bridge`` table per L3 network and host, replaced atomically by ``nft -f``."""
    l3, vms = d.l3, d.vms
    md = v.METADATA_IP
    taps = ", ".join(f'"{e.tap}"' for e in vms)
    lines = [f"table bridge {table}", f"delete table bridge {table}", f"table bridge {table} {{"]
    for e in vms:
        lines += [
            f"  chain vm_{e.tap} {{",
            f"    ether saddr != {e.mac} drop",
            "    ether type != { ip, arp, ip6 } drop",
            f"    arp saddr ether != {e.mac} drop",
            f"    arp saddr ip != {{ 0.0.0.0, {e.ip} }} drop",
            "    ip saddr 0.0.0.0 udp sport 68 udp dport 67 return",
            f"    ip saddr != {e.ip} drop",
            "    udp sport 67 drop",
            "  }",
        ]
    vmap = ", ".join(f'"{e.tap}" : jump vm_{e.tap}' for e in vms)
    # Source checks run at prerouting: before the bridge learns the source MAC, so a spoofed
    # frame can neither pass nor poison the forwarding table (steal another VM's traffic).
    lines += ["  chain prerouting {", "    type filter hook prerouting priority -300; policy accept;"]
    if vms:
        lines.append(f"    iifname vmap {{ {vmap} }}")
    if vms and "Userdata" in l3.services:
        # EC2's address is routed through the gateway: hand those frames to the local metadata service
        lines.append(f"    iifname {{ {taps} }} ip daddr {md} ether daddr set {ns_mac}")
    lines += ["  }", "  chain forward {", "    type filter hook forward priority 0; policy accept;"]
    up = l3.uplink
    if up:
        ips = f"{{ {l3.dhcp_ip}, {md} }}"
        lines += [
            f'    iifname "{up}" oifname "{outer}" drop',
            f'    iifname "{outer}" oifname "{up}" drop',
            f'    iifname "{up}" udp sport 67 ip saddr {l3.dhcp_ip} drop',
            f'    oifname "{up}" ip saddr {l3.dhcp_ip} udp sport 67 drop',
            f'    iifname "{up}" arp daddr ip {ips} drop',
            f'    oifname "{up}" arp daddr ip {ips} drop',
            f'    iifname "{up}" arp saddr ip {ips} drop',
            f'    oifname "{up}" arp saddr ip {ips} drop',
            f'    oifname "{up}" ether saddr {ns_mac} drop',
        ]
        if vms:
            lines.append(f'    iifname {{ {taps} }} oifname "{up}" udp dport 67 drop')
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"
