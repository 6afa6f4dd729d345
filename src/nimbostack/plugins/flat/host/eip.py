"""Distributed EIP on the VM's host: one network namespace per EIP, between the public bridge and
the VM's private bridge::

    public bridge ──veth── [pub0: VIP/prefix, default via the public gateway]
                            namespace: DNAT VIP → VM IP, SNAT VM IP → VIP (nftables ip nat)
    VM's bridge  ──veth── [priv0: the private gateway's IP/32, route VM IP/32]

The VM keeps its private address and its gateway; a ``bridge`` table makes the namespace the only
answer to the VM's ARP for its gateway and keeps the namespace's private side talking to that
VM's tap only (no other VM on the L3 network sees it). ``/flat/eip/sync`` carries the full set of
EIPs a host serves: missing ones are set up, changed ones rebuilt, others removed."""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from nimbostack.agent.bridge import ensure_bridge
from nimbostack.agent.driver import DriverError
from nimbostack.plugins.flat.host.service import FlatService
from nimbostack.plugins.flat.host.tools import run, tool
from nimbostack.wire import validate as v

PUB, PRIV = "pub0", "priv0"


@dataclass(frozen=True)
class EipConf:
    eip_uuid: str
    vip_uuid: str
    vip: str
    vip_prefix: int
    vip_gateway: str | None
    public_bridge: str
    public_phys: str | None
    public_vlan: int | None
    nic_uuid: str
    vm_ip: str
    vm_mac: str
    private_bridge: str
    private_phys: str | None
    private_vlan: int | None
    private_gateway: str

    @property
    def tap(self) -> str:
        return v.tap_name(self.nic_uuid)


def parse(e: Any) -> EipConf:
    if not isinstance(e, dict):
        raise ValueError("an EIP must be an object")
    vip = v.ipv4(e.get("vip"), "vip")
    prefix = v.netmask(e.get("vipNetmask"))
    gw = e.get("vipGateway") or None
    gw = v.ipv4(gw, "vipGateway") if gw else None
    if gw and (gw == vip or ipaddress.IPv4Address(gw) not in ipaddress.IPv4Network(f"{vip}/{prefix}", strict=False)):
        gw = None  # not reachable on the VIP's subnet: no default route
    pub_phys, priv_phys = e.get("publicPhysicalInterface") or None, e.get("privatePhysicalInterface") or None
    return EipConf(
        eip_uuid=v.uuid(e.get("eipUuid"), "eipUuid"),
        vip_uuid=v.uuid(e.get("vipUuid"), "vipUuid"),
        vip=vip,
        vip_prefix=prefix,
        vip_gateway=gw,
        public_bridge=v.ifname(e.get("publicBridge"), "publicBridge"),
        public_phys=v.ifname(pub_phys, "publicPhysicalInterface") if pub_phys else None,
        public_vlan=v.vlan(e.get("publicVlan")),
        nic_uuid=v.uuid(e.get("nicUuid"), "nicUuid"),
        vm_ip=v.ipv4(e.get("vmIp"), "vmIp"),
        vm_mac=v.mac(e.get("vmMac"), "vmMac"),
        private_bridge=v.ifname(e.get("privateBridge"), "privateBridge"),
        private_phys=v.ifname(priv_phys, "privatePhysicalInterface") if priv_phys else None,
        private_vlan=v.vlan(e.get("privateVlan")),
        private_gateway=v.ipv4(e.get("privateGateway"), "privateGateway"),
    )


class EipService:
    def __init__(self, flat: FlatService) -> None:
        self.flat = flat
        self.simulated: dict[str, dict[str, dict[str, Any]]] = {}  # host -> vip uuid -> EIP body
        self.applied: dict[str, EipConf] = {}

    def names(self, vip_uuid: str) -> SimpleNamespace:
        ns = f"{self.flat.prefix}eip-{vip_uuid[:10]}"
        h = hashlib.sha256(ns.encode()).hexdigest()[:10]
        return SimpleNamespace(ns=ns, pub=f"ne{h}p", priv=f"ne{h}v", table=ns.replace("-", "_"))

    @property
    def dir(self) -> Path:
        return self.flat.state_dir / "eips"

    async def sync(self, host_uuid: str, eips: list[Any]) -> dict[str, Any]:
        if not isinstance(eips, list):
            raise ValueError("eips must be a list")
        confs = [parse(e) for e in eips]
        vips = [c.vip_uuid for c in confs]
        if len(set(vips)) != len(vips) or len({c.nic_uuid for c in confs}) != len(confs):
            raise ValueError("an EIP's VIP or NIC appears twice")
        if self.flat.simulate:
            self.simulated[host_uuid] = {c.vip_uuid: copy.deepcopy(e) for c, e in zip(confs, eips, strict=True)}
            return {"simulated": True}
        async with self.flat.global_lock:
            wanted = {c.vip_uuid: c for c in confs}
            for vip_uuid in sorted(set(self._known()) - set(wanted)):
                await self._release(vip_uuid)
            for c in confs:
                if self.applied.get(c.vip_uuid) != c or not Path(f"/run/netns/{self.names(c.vip_uuid).ns}").exists():
                    await self._release(c.vip_uuid)
                    await self._setup(host_uuid, c)
        return {"eips": sorted(wanted)}

    def _known(self) -> list[str]:
        found = set(self.applied)
        if self.dir.is_dir():
            found |= {p.stem for p in self.dir.glob("*.json")}
        return sorted(found)

    async def _setup(self, host_uuid: str, c: EipConf) -> None:
        ip, nft = tool("ip"), tool("nft")
        if not ip or not nft:
            raise DriverError("FLAT_TOOLS_MISSING", "the host lacks tools the EIP needs", "ip (iproute2), nft")
        n = self.names(c.vip_uuid)
        warnings: list[str] = []
        for bridge, phys, vlan in (
            (c.public_bridge, c.public_phys, c.public_vlan),
            (c.private_bridge, c.private_phys, c.private_vlan),
        ):
            warnings.extend(await ensure_bridge(bridge, phys or "", vlan))
        pub_mac, priv_mac = v.host_mac(host_uuid, n.ns, "pub"), v.host_mac(host_uuid, n.ns, "priv")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"{c.vip_uuid}.json").write_text(json.dumps({"vipUuid": c.vip_uuid, "eipUuid": c.eip_uuid}))
        cmds = [
            [ip, "netns", "add", n.ns],
            [ip, "-n", n.ns, "link", "set", "dev", "lo", "up"],
            [ip, "link", "add", n.pub, "type", "veth", "peer", "name", PUB, "netns", n.ns],
            [ip, "link", "add", n.priv, "type", "veth", "peer", "name", PRIV, "netns", n.ns],
            [ip, "link", "set", "dev", n.pub, "addrgenmode", "none"],
            [ip, "link", "set", "dev", n.priv, "addrgenmode", "none"],
            [ip, "-n", n.ns, "link", "set", "dev", PUB, "address", pub_mac, "addrgenmode", "none"],
            [ip, "-n", n.ns, "link", "set", "dev", PRIV, "address", priv_mac, "addrgenmode", "none"],
            [ip, "-n", n.ns, "addr", "add", f"{c.vip}/{c.vip_prefix}", "dev", PUB],
            [ip, "-n", n.ns, "addr", "add", f"{c.private_gateway}/32", "dev", PRIV],
            [ip, "-n", n.ns, "link", "set", "dev", PUB, "up"],
            [ip, "-n", n.ns, "link", "set", "dev", PRIV, "up"],
            [ip, "-n", n.ns, "route", "add", f"{c.vm_ip}/32", "dev", PRIV, "src", c.private_gateway],
            [ip, "link", "set", "dev", n.pub, "master", c.public_bridge, "up"],
            [ip, "link", "set", "dev", n.priv, "master", c.private_bridge, "up"],
        ]
        if c.vip_gateway:
            cmds.append([ip, "-n", n.ns, "route", "add", "default", "via", c.vip_gateway, "dev", PUB])
        # the tables first: no frame crosses before the namespace is fenced in
        await run([nft, "-f", "-"], stdin=_bridge_rules(n.table, c, n.priv, priv_mac).encode())
        for argv in cmds:
            await run(argv)
        forward = "open('/proc/sys/net/ipv4/ip_forward', 'w').write('1')"
        await run([ip, "netns", "exec", n.ns, self.flat.python, "-c", forward])
        await run([ip, "netns", "exec", n.ns, nft, "-f", "-"], stdin=_nat_rules(c).encode())
        self.applied[c.vip_uuid] = c

    async def _release(self, vip_uuid: str) -> None:
        n = self.names(vip_uuid)
        ip, nft = tool("ip"), tool("nft")
        if ip:
            for dev in (n.pub, n.priv):
                if Path(f"/sys/class/net/{dev}").exists():
                    await run([ip, "link", "del", dev], check=False)
            if Path(f"/run/netns/{n.ns}").exists():
                await run([ip, "netns", "del", n.ns], check=False)
        if nft:
            await run([nft, "delete", "table", "bridge", n.table], check=False)
        (self.dir / f"{vip_uuid}.json").unlink(missing_ok=True)
        self.applied.pop(vip_uuid, None)

    async def close(self) -> None:
        """EIPs stay in place when the agent stops (the kernel does the NAT, not us)."""

    def state(self, host_uuid: str) -> dict[str, Any]:
        if self.flat.simulate:
            return copy.deepcopy(self.simulated.get(host_uuid, {}))
        return {u: {"vip": c.vip, "vmIp": c.vm_ip} for u, c in self.applied.items()}


def _nat_rules(c: EipConf) -> str:
    return (
        "table ip nimbo_eip\n"
        "delete table ip nimbo_eip\n"
        "table ip nimbo_eip {\n"
        "  chain prerouting {\n"
        "    type nat hook prerouting priority -100; policy accept;\n"
        f'    iifname "{PUB}" ip daddr {c.vip} dnat to {c.vm_ip}\n'
        "  }\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority 100; policy accept;\n"
        f'    oifname "{PUB}" ip saddr {c.vm_ip} snat to {c.vip}\n'
        "  }\n"
        "}\n"
    )


def _bridge_rules(table: str, c: EipConf, priv: str, priv_mac: str) -> str:
    return (
        f"table bridge {table}\n"
        f"delete table bridge {table}\n"
        f"table bridge {table} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority 0; policy accept;\n"
        # the namespace's private side talks to its VM only
        f'    iifname "{priv}" oifname != "{c.tap}" drop\n'
        # the VM's gateway is the namespace: other answers for the gateway's IP do not reach it
        f'    oifname "{c.tap}" arp saddr ip {c.private_gateway} ether saddr != {priv_mac} drop\n'
        "  }\n"
        "}\n"
    )
