"""Security groups for real: the agent's ``/sg/apply`` chains in a bridge nftables table, one tiny
guest on a tap of a bridge, and two client namespaces on the same bridge.

The guest serves HTTP on 8080 and 8081 (busybox httpd); the clients connect from 198.18.8.11 and
198.18.8.12 and listen on 9090/9091 for the guest's own connections (busybox nc). The rules are
applied before QEMU starts, as the VM start extension does. Every address is in 198.18.0.0/15;
the bridge, the namespaces, the tap and the table are made and removed here. Skips unless root
with nft, ip and qemu-system-x86_64."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from image_fixtures import tiny_image_dir  # noqa: E402,F401  (pytest fixture)
from test_flat_dhcp import TapVM, _ready  # noqa: E402

pytestmark = pytest.mark.e2e

BRIDGE = "nbsgbr0"
TABLE = "nbsg_e2e"
GUEST, C1, C2 = "198.18.8.10", "198.18.8.11", "198.18.8.12"
NIC = f"{0x5E6A0000:08x}" + uuid.uuid4().hex[:24]
VM = uuid.uuid4().hex
CLIENTS = {"nbsgc1": (C1, "nbsgh1"), "nbsgc2": (C2, "nbsgh2")}


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and r.returncode:
        raise AssertionError(f"{argv}: {r.stdout}{r.stderr}")
    return r


def _need() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, bridges, nftables)")
    for tool in ("nft", "ip", "qemu-system-x86_64"):
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            pytest.skip(f"{tool} is not installed (apt-get install $(grep -v '^#' scripts/network-packages.txt))")


def _cleanup() -> None:
    for ns in CLIENTS:
        sh("ip", "netns", "del", ns, check=False)
    for link in (BRIDGE, *(h for _, h in CLIENTS.values())):
        sh("ip", "link", "del", link, check=False)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(": ")[1].split("@")[0] if ": " in line else ""
        if name.startswith("vnic5e6a"):
            sh("ip", "link", "del", name, check=False)
    sh("nft", "delete", "table", "bridge", TABLE, check=False)


class AgentSide:
    """The agent's /sg/* commands on a loop thread of their own, as the agent server runs them."""

    def __init__(self, state_dir: Path) -> None:
        from nimbostack.agent import plugins, server  # noqa: F401  (the server registers the core commands)
        from nimbostack.agent.host import COMMANDS, Agent
        from nimbostack.agent.storage import LocalStorage
        from nimbostack.plugins.security_group.host.service import SgService
        from nimbostack.wire import pki

        plugins.load_all()
        self.commands = COMMANDS
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        creds = pki.agent_bundle(pki.Authority(state_dir / "pki"), state_dir / "agent.pem", "sg:1", [])
        self.agent = Agent(lambda h, b: None, LocalStorage(simulate=True), False, creds)
        self.agent.extensions["security_group"] = SgService(self.agent, table=TABLE, state_dir=state_dir / "sg")

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        body = json.loads(json.dumps({"hostUuid": "e2e0" * 8, **body}))  # what the wire carries

        async def go() -> dict[str, Any]:
            return await self.commands[path](self.agent, body)

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(60)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.agent.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def rule(protocol: str, start: int, end: int, cidr: str) -> dict[str, Any]:
    return {"protocol": protocol, "startPort": start, "endPort": end, "allowedCidr": cidr}


def nic(ingress: list[dict[str, Any]], egress: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"nicUuid": NIC, "vmUuid": VM, "ingress": ingress, "egress": egress or []}


CONNECT = (
    "import socket,sys\n"
    "s=socket.socket(); s.settimeout(float(sys.argv[3]))\n"
    "try:\n"
    "    s.connect((sys.argv[1], int(sys.argv[2]))); s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
    "    print('OPEN', s.recv(200).decode(errors='replace').split()[1])\n"
    "except OSError as e:\n"
    "    print('CLOSED', type(e).__name__)\n"
)


def connect(ns: str, port: int, timeout: float = 1.5) -> bool:
    out = sh("ip", "netns", "exec", ns, sys.executable, "-c", CONNECT, GUEST, str(port), str(timeout)).stdout
    return out.startswith("OPEN 200")


# one ICMP echo request over a raw socket (the host need not have ping); OPEN when it is answered
PING = (
    "import os,select,socket,struct,sys\n"
    "def csum(b):\n"
    "    s=sum(struct.unpack('!%dH' % (len(b)//2), b)); s=(s>>16)+(s&0xffff); return ~(s+(s>>16))&0xffff\n"
    "s=socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n"
    "ident=os.getpid()&0xffff; hdr=struct.pack('!BBHHH',8,0,0,ident,1)+b'nimbo-sg'\n"
    "pkt=hdr[:2]+struct.pack('!H',csum(hdr))+hdr[4:]\n"
    "s.sendto(pkt,(sys.argv[1],0))\n"
    "while select.select([s],[],[],float(sys.argv[2]))[0]:\n"
    "    data=s.recv(1500); icmp=data[(data[0]&15)*4:]\n"
    "    if icmp[0]==0 and struct.unpack('!H',icmp[4:6])[0]==ident: print('OPEN'); break\n"
    "else: print('CLOSED')\n"
)


def ping(ns: str, timeout: float = 1.5) -> bool:
    return sh("ip", "netns", "exec", ns, sys.executable, "-c", PING, GUEST, str(timeout)).stdout.startswith("OPEN")


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    _need()
    image_dir = request.getfixturevalue("tiny_image_dir")
    _cleanup()
    tmp = tmp_path_factory.mktemp("sg")
    side = AgentSide(tmp)
    guest: TapVM | None = None
    listeners: list[subprocess.Popen[bytes]] = []
    try:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "link", "set", "dev", BRIDGE, "up")
        for ns, (addr, host_end) in CLIENTS.items():
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", "dev", host_end, "master", BRIDGE, "up")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "dev", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "dev", "lo", "up")
        # c2 takes the guest's own connections on 9090 and 9091
        for port in (9090, 9091):
            listeners.append(subprocess.Popen(  # noqa: S603
                ["ip", "netns", "exec", "nbsgc2", sys.executable, "-c",
                 "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                 f"s.bind(('{C2}', {port})); s.listen(8)\n"
                 "while True:\n    c, _ = s.accept(); c.sendall(b'hi\\n'); c.close()\n"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from nimbostack.wire.validate import tap_name

        tap = tap_name(NIC)
        sh("ip", "tuntap", "add", "dev", tap, "mode", "tap")
        sh("ip", "link", "set", "dev", tap, "master", BRIDGE, "up")
        # before the guest's NIC is up: only TCP 8080 from c1 comes in
        first = side.call("/sg/apply", {"vmUuids": [VM], "nics": [nic([rule("TCP", 8080, 8080, f"{C1}/32")])]})
        guest = TapVM(tmp / "guest", image_dir / "tiny.qcow2", tap, "fa:16:3e:5e:6a:10").start()
        _ready(guest, 90)
        guest.shell(
            f"killall udhcpc; ip addr flush dev eth0; ip addr add {GUEST}/24 dev eth0; ip link set eth0 up; "
            "mkdir -p /w && echo sg > /w/index.html && httpd -p 8080 -h /w && httpd -p 8081 -h /w",
            "NBSG-SETUP",
        )
        yield {"side": side, "guest": guest, "tap": tap, "first": first}
    finally:
        if guest is not None:
            guest.stop()
        for p in listeners:
            p.kill()
            p.wait(5)
        side.close()
        _cleanup()


def guest_connects(guest: TapVM, port: int) -> bool:
    """busybox nc from the guest to c2; its exit status is on the marker line."""
    marker = f"NBSG-NC{port}-{time.monotonic_ns()}"
    guest.shell(f"echo | nc -w 2 {C2} {port} | grep -q hi", marker, 20)
    return re.findall(rf"{marker}=(\d+)", guest.log())[-1] == "0"


def test_ingress_is_default_deny_and_rules_change_live(world: Any) -> None:
    side, guest = world["side"], world["guest"]
    assert world["first"]["nics"] == 1
    # allowed from one CIDR, refused from another; every other port and ICMP refused
    assert connect("nbsgc1", 8080)
    assert not connect("nbsgc2", 8080)
    assert not connect("nbsgc1", 8081)
    assert not ping("nbsgc1")
    # a rule added: ICMP echo from c2 only
    side.call("/sg/apply", {"nics": [nic([rule("TCP", 8080, 8080, f"{C1}/32"), rule("ICMP", 8, -1, f"{C2}/32")])]})
    assert ping("nbsgc2") and not ping("nbsgc1")
    # no egress rule: the guest reaches anything
    assert guest_connects(guest, 9090) and guest_connects(guest, 9091)
    # an egress rule: only what it allows leaves the guest, and the guest still answers c1
    ingress, egress = [rule("TCP", 8080, 8080, f"{C1}/32")], [rule("TCP", 9091, 9091, f"{C2}/32")]
    side.call("/sg/apply", {"nics": [nic(ingress, egress)]})
    assert guest_connects(guest, 9091)
    assert not guest_connects(guest, 9090)
    assert connect("nbsgc1", 8080)
    # the rule removed: c1's connection is refused too
    side.call("/sg/apply", {"nics": [nic([], [rule("TCP", 9091, 9091, f"{C2}/32")])]})
    assert not connect("nbsgc1", 8080)
    table = sh("nft", "list", "table", "bridge", TABLE).stdout
    assert f"in_{world['tap']}" in table and "dport 8080" not in table


def test_a_restarted_agent_removes_the_vms_chains_and_nothing_is_left(world: Any, tmp_path: Path) -> None:
    from nimbostack.plugins.security_group.host.service import SgService

    side, tap = world["side"], world["tap"]
    side.call("/sg/apply", {"nics": [nic([])]})
    assert not connect("nbsgc2", 8080)
    # a new agent (same state directory) knows whose chains they are: the VM's release takes them
    old = side.agent.extensions["security_group"]
    side.agent.extensions["security_group"] = SgService(side.agent, table=TABLE, state_dir=old.state_dir)
    side.call("/sg/apply", {"vmUuids": [VM], "nics": []})
    table = sh("nft", "list", "table", "bridge", TABLE).stdout
    assert tap not in table
    assert connect("nbsgc2", 8080) and connect("nbsgc1", 8081) and ping("nbsgc1")
    # a full apply (host reconnect) puts it back exactly
    side.call("/sg/apply", {"full": True, "nics": [nic([rule("TCP", 8081, 8081, f"{C2}/32")])]})
    assert connect("nbsgc2", 8081) and not connect("nbsgc2", 8080)
    # no NIC left to filter: no table left either
    side.call("/sg/apply", {"full": True, "nics": []})
    assert sh("nft", "list", "table", "bridge", TABLE, check=False).returncode != 0
