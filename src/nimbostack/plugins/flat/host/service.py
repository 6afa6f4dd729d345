"""The host side of the Flat provider: per L3 network a namespace, a veth into the bridge, a
dnsmasq with static leases, a metadata HTTP server and a ``bridge`` nftables table.

``apply`` is idempotent and replaces what was there; ``release`` removes everything of one L3
network. A supervisor task restarts dnsmasq or the metadata server within a second or two when
either dies. dnsmasq and the metadata server run in their own sessions, so they keep serving
while the agent restarts; the next agent adopts them (or replaces them when their configuration
changed). In simulator mode (``Agent.multi_host``) nothing is touched: the desired state of each
simulated host is recorded so management-plane tests can look at it."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nimbostack.agent.bridge import ensure_bridge
from nimbostack.agent.driver import DriverError
from nimbostack.plugins.flat.host import render
from nimbostack.plugins.flat.host.tools import run, tool
from nimbostack.wire import validate as v

log = logging.getLogger(__name__)

INNER = "nbdhcp0"  # the namespace's end of the veth; the name only exists inside the namespace
SUPERVISE_EVERY = 0.5
_PREFIX = re.compile(r"[a-z][a-z0-9-]{0,5}")


def _write(path: Path, text: str, mode: int = 0o644) -> bool:
    """Atomically replace ``path`` with ``text``; False when it already held exactly that."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _in_netns(pid: int, ns: str) -> bool:
    if not ns:
        return True
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return False


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
        return pid if pid > 1 else None
    except (OSError, ValueError):
        return None


class Proc:
    """One supervised process (dnsmasq or the metadata server) of one L3 network."""

    def __init__(self, name: str, argv: list[str], log_path: Path, pid_path: Path, marker: str, ns: str = "") -> None:
        self.name, self.argv, self.log_path, self.pid_path, self.ns = name, argv, log_path, pid_path, ns
        self.marker = marker  # a string in the command line that proves the pid is ours
        self.popen: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.restarts = 0
        self.wanted = True

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return self.pid is not None and _pid_alive(self.pid) and self.marker in _cmdline(self.pid)

    def adopt(self) -> bool:
        """Take over a process a previous agent started with this very command line."""
        pid = _read_pid(self.pid_path)
        # `ip netns exec NS CMD...` execs CMD: the process shows CMD's arguments, in NS
        own = " ".join(self.argv[4:] if self.ns else self.argv)
        if pid and _pid_alive(pid) and _cmdline(pid).strip() == own and _in_netns(pid, self.ns):
            self.pid, self.popen = pid, None
            return True
        self.kill_stale()
        return False

    def kill_stale(self) -> None:
        pid = _read_pid(self.pid_path)
        if pid and _pid_alive(pid) and self.marker in _cmdline(pid):
            _terminate(pid)

    def start(self) -> None:
        with open(self.log_path, "ab") as logf:
            self.popen = subprocess.Popen(  # noqa: ASYNC220 - fork+exec only, it does not wait
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,  # survives the agent, not killed by its terminal
                close_fds=True,
            )
        self.pid = self.popen.pid
        _write(self.pid_path, f"{self.pid}\n")

    def signal(self, sig: int) -> None:
        if self.pid and self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self.wanted = False
        if self.pid and self.alive():
            _terminate(self.pid, self.popen)
        self.popen = None
        self.pid = None


def _terminate(pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        if popen is not None:
            if popen.poll() is not None:
                return
        elif not _pid_alive(pid):
            return
        time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if popen is not None:
        popen.wait(2)


# how long add_vm's entries are kept for a full state that was computed before them (seconds)
ADDED_KEEP = 600.0


def _merged(base: list[dict[str, Any]], entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``base`` with ``entries`` in place of its entries of the same VMs, NICs, IPs or MACs (as a
    full state from the management node's records would have them), in that state's order (by IP)."""
    vms, nics, ips, macs = ({e.get(k) for e in entries} for k in ("vmUuid", "nicUuid", "ip", "mac"))
    kept = [
        e
        for e in base
        if e.get("vmUuid") not in vms
        and e.get("nicUuid") not in nics
        and e.get("ip") not in ips
        and e.get("mac") not in macs
    ]
    return sorted(kept + copy.deepcopy(entries), key=lambda e: str(e.get("ip")))


@dataclass
class Runtime:
    """What this agent knows it has set up for one L3 network."""

    l3_uuid: str
    ns: str
    outer: str
    table: str
    dir: Path
    ns_mac: str = ""
    addr: tuple[str, int, str] | None = None
    nft: str | None = None
    dnsmasq: Proc | None = None
    metadata: Proc | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    warnings: list[str] = field(default_factory=list)
    body: dict[str, Any] | None = None  # the last /flat/apply body applied here (add_vm merges into it)


class FlatService:
    def __init__(
        self,
        agent: Any,
        prefix: str = "nimbo-",
        state_dir: str | Path = "/run/nimbostack/flat",
        python: str = sys.executable,
        metadata_port: int = 80,
    ) -> None:
        if not _PREFIX.fullmatch(prefix.rstrip("-")) or not prefix.endswith("-"):
            raise ValueError(f"namespace prefix {prefix!r} must be a few of [a-z0-9] ending with '-'")
        self.agent = agent
        self.prefix = prefix
        self.state_dir = Path(state_dir)
        self.python = python
        self.metadata_port = metadata_port
        self.simulated: dict[str, dict[str, dict[str, Any]]] = {}  # host uuid -> L3 uuid -> body
        # (host uuid on a simulator, else "", L3 uuid) -> VM uuid -> (seq, its entries): what
        # add_vm served, for a full state computed before it (lower seq) that arrives after it
        self.added: dict[tuple[str, str], dict[str, tuple[int, list[dict[str, Any]], float]]] = {}
        self.runtimes: dict[str, Runtime] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self.global_lock = asyncio.Lock()

    # --- names ------------------------------------------------------------------------------

    def runtime(self, l3_uuid: str) -> Runtime:
        rt = self.runtimes.get(l3_uuid)
        if rt is None:
            ns = f"{self.prefix}{l3_uuid[:10]}"
            rt = Runtime(
                l3_uuid=l3_uuid,
                ns=ns,
                outer="nf" + hashlib.sha256(ns.encode()).hexdigest()[:11],
                table=ns.replace("-", "_"),
                dir=self.state_dir / ns,
            )
            self.runtimes[l3_uuid] = rt
        return rt

    @property
    def simulate(self) -> bool:
        return bool(getattr(self.agent, "multi_host", False))

    # --- commands ---------------------------------------------------------------------------

    def _added_key(self, host_uuid: str, l3_uuid: str) -> tuple[str, str]:
        return (host_uuid if self.simulate else "", l3_uuid)

    def _with_later_entries(self, body: dict[str, Any], host_uuid: str, l3_uuid: str) -> dict[str, Any]:
        """A full state with the entries add_vm served after the node read it (a later seq): the
        node sends VMs' entries with their start, outside the queue that orders its full states,
        so a full state read before a VM started may arrive after that VM's entries."""
        key = self._added_key(host_uuid, l3_uuid)
        seq = body.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            self.added.pop(key, None)  # no order known: the full state is all there is
            return body
        later = {vm: added for vm, added in self.added.get(key, {}).items() if added[0] > seq}
        if not later:
            self.added.pop(key, None)
            return body
        self.added[key] = later
        entries = [e for _, vm_entries, _ in later.values() for e in vm_entries]
        return {**body, "vms": _merged(body.get("vms") or [], entries)}

    async def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        desired = render.parse(body)
        later = self._with_later_entries(body, desired.host_uuid, desired.l3.uuid)
        return await self._apply_body(later, desired if later is body else render.parse(later))

    async def _apply_body(self, body: dict[str, Any], desired: render.Desired) -> dict[str, Any]:
        started = time.perf_counter()
        if self.simulate:
            self.simulated.setdefault(desired.host_uuid, {})[desired.l3.uuid] = copy.deepcopy(body)
            return {"simulated": True}
        rt = self.runtime(desired.l3.uuid)
        async with rt.lock:
            rt.body = None  # a failed apply leaves an unknown state: the next add_vm asks for all
            await self._apply(rt, desired)
            rt.body = body
        self._ensure_supervisor()
        return {
            "namespace": rt.ns,
            "dhcpServerMac": rt.ns_mac,
            "warnings": list(rt.warnings),
            "elapsedMs": round((time.perf_counter() - started) * 1000, 2),
        }

    async def add_vm(self, body: dict[str, Any]) -> dict[str, Any]:
        """``/flat/apply-vm``: serve one VM's NICs (``vms``, the entries ``/flat/apply`` takes) on
        an L3 network this host already serves with the same settings (``l3``), the other VMs
        unchanged. A VM start sends its own entries instead of the state of every VM on its
        host, which grew with the host's VMs. Entries of the same VM, NIC, IP or MAC are replaced,
        as a full apply from the management node's records would. Without a state to merge into
        (the agent restarted, the L3's settings changed) it answers FLAT_FULL_STATE_NEEDED and
        the management node sends the full state."""
        delta = render.parse(body)  # validates the L3 settings and the new entries
        vm_uuid = v.uuid(body.get("vmUuid"), "vmUuid")
        if any(e.vm_uuid != vm_uuid for e in delta.vms):
            raise ValueError(f"vms must all be entries of VM {vm_uuid}")
        if self.simulate:
            base = self.simulated.get(delta.host_uuid, {}).get(delta.l3.uuid)
        else:
            base = self.runtime(delta.l3.uuid).body
        if base is None or base.get("l3") != body["l3"]:
            raise DriverError(
                "FLAT_FULL_STATE_NEEDED",
                "this host has no Flat state of the L3 network to add the VM to",
                f"L3 network {delta.l3.uuid}: send the full state with /flat/apply",
            )
        merged = {
            "hostUuid": delta.host_uuid,
            "seq": base.get("seq"),
            "l3": body["l3"],
            "vms": _merged(base.get("vms") or [], body["vms"]),
        }
        if self.simulate:  # the kept entries were checked when they were applied
            self.simulated[delta.host_uuid][delta.l3.uuid] = merged
            answer: dict[str, Any] = {"simulated": True}
        else:
            answer = await self._apply_body(merged, render.parse(merged))
        seq = body.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            self._remember(self._added_key(delta.host_uuid, delta.l3.uuid), vm_uuid, seq, body["vms"])
        return answer

    def _remember(self, key: tuple[str, str], vm_uuid: str, seq: int, entries: list[dict[str, Any]]) -> None:
        """Keep a VM's entries for ADDED_KEEP seconds: longer than any full state computed before
        them can be on its way (a command's budget is the API's, and a full push is a short one)."""
        added = self.added.setdefault(key, {})
        added.pop(vm_uuid, None)  # to the end: the dict stays in the order of arrival
        now = time.monotonic()
        added[vm_uuid] = (seq, copy.deepcopy(entries), now)
        while added:
            oldest = next(iter(added))
            if now - added[oldest][2] < ADDED_KEEP:
                break
            del added[oldest]

    async def release(self, host_uuid: str, l3_uuid: str, seq: Any = None) -> dict[str, Any]:
        """Tear the L3 network down on this host. ``seq``: that of the node's read that found no
        VM left here; entries of a VM that started since (a later seq, sent with its start) keep
        the L3 served instead."""
        v.uuid(l3_uuid, "l3Uuid")
        key = self._added_key(host_uuid, l3_uuid)
        if isinstance(seq, int) and not isinstance(seq, bool):
            if any(added[0] > seq for added in self.added.get(key, {}).values()):
                return {"kept": True}
        self.added.pop(key, None)
        if self.simulate:
            self.simulated.get(host_uuid, {}).pop(l3_uuid, None)
            return {"simulated": True}
        rt = self.runtime(l3_uuid)
        async with rt.lock:
            await self._release(rt)
        self.runtimes.pop(l3_uuid, None)
        return {}

    async def sync(self, host_uuid: str, keep: list[str]) -> dict[str, Any]:
        """Release every L3 network set up on this host that is not in ``keep``."""
        keep_set = {v.uuid(u, "l3Uuids") for u in keep}
        if self.simulate:
            have = self.simulated.get(host_uuid, {})
            gone = [u for u in have if u not in keep_set]
            for u in gone:
                have.pop(u)
            return {"released": gone}
        gone = []
        for l3_uuid in self._known_l3s():
            if l3_uuid not in keep_set:
                await self.release(host_uuid, l3_uuid)
                gone.append(l3_uuid)
        return {"released": gone}

    def _known_l3s(self) -> list[str]:
        found = set(self.runtimes)
        if self.state_dir.is_dir():
            for d in self.state_dir.iterdir():
                if d.name.startswith(self.prefix):
                    try:
                        found.add(json.loads((d / "applied.json").read_text())["l3"]["uuid"])
                    except (OSError, ValueError, KeyError, TypeError):
                        continue
        return sorted(found)

    def state(self, host_uuid: str) -> dict[str, Any]:
        """What is applied on a host (simulated hosts: the recorded bodies)."""
        if self.simulate:
            return copy.deepcopy(self.simulated.get(host_uuid, {}))
        out = {}
        for l3_uuid in self._known_l3s():
            try:
                out[l3_uuid] = json.loads((self.runtime(l3_uuid).dir / "applied.json").read_text())
            except (OSError, ValueError):
                continue
        return out

    async def close(self) -> None:
        """Stop supervising; dnsmasq and the metadata servers keep serving (DHCP outlives us)."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except asyncio.CancelledError:
                pass
            self._supervisor = None

    # --- real hosts -------------------------------------------------------------------------

    async def _apply(self, rt: Runtime, d: render.Desired) -> None:
        ip, nft, dnsmasq = tool("ip"), tool("nft"), tool("dnsmasq")
        missing = [n for n, p in (("ip (iproute2)", ip), ("nft (nftables)", nft), ("dnsmasq", dnsmasq)) if not p]
        if missing:
            raise DriverError("FLAT_TOOLS_MISSING", "the host lacks tools the Flat provider needs", ", ".join(missing))
        assert ip and nft and dnsmasq
        l3 = d.l3
        rt.ns_mac = v.host_mac(d.host_uuid, rt.ns)
        rt.warnings = []
        rt.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(rt.dir, 0o755)
        await self._ensure_bridge(ip, rt, l3)
        await self._ensure_namespace(ip, rt, l3)
        # files: dnsmasq reads the hosts file as an unprivileged user; the metadata state holds
        # userdata, so only root reads it
        conf = rt.dir / "dnsmasq.conf"
        hosts = rt.dir / "dhcp-hosts"
        user, group = _dnsmasq_user(rt.dir)
        conf_changed = _write(
            conf, render.render_dnsmasq_conf(l3, INNER, str(hosts), str(rt.dir / "dnsmasq.pid"), user, group)
        )
        hosts_changed = _write(hosts, render.render_dhcp_hosts(d.vms))
        _write(rt.dir / "metadata.json", json.dumps(render.metadata_state(d), sort_keys=True), 0o600)
        # rules before the processes, so no VM frame is ever forwarded unfiltered
        text = render.render_nft(rt.table, d, rt.outer, rt.ns_mac)
        if text != rt.nft:
            await run([nft, "-f", "-"], stdin=text.encode())
            rt.nft = text
        # processes: dnsmasq only when Flat provides DHCP, the metadata server only for Userdata
        dns_argv = [ip, "netns", "exec", rt.ns, dnsmasq, "--keep-in-foreground", f"--conf-file={conf}"]
        state = str(rt.dir / "metadata.json")
        metadata = "nimbostack.plugins.flat.host.metadata"
        md_argv = [ip, "netns", "exec", rt.ns, self.python, "-m", metadata, "--state", state]
        md_argv += ["--port", str(self.metadata_port)]
        await self._ensure_proc(rt, "dnsmasq", "DHCP" in l3.services, dns_argv, str(conf), conf_changed, hosts_changed)
        await self._ensure_proc(rt, "metadata", "Userdata" in l3.services, md_argv, state, False, False)
        _write(rt.dir / "applied.json", json.dumps(_applied(d), sort_keys=True), 0o600)

    async def _ensure_proc(
        self, rt: Runtime, name: str, wanted: bool, argv: list[str], marker: str, restart: bool, reload: bool
    ) -> None:
        current: Proc | None = getattr(rt, name)
        if not wanted:
            setattr(rt, name, None)
            if current is not None:
                await asyncio.to_thread(current.stop)
            else:
                stale = Proc(name, [], rt.dir / f"{name}.log", rt.dir / f"{name}.pid", marker)
                await asyncio.to_thread(stale.kill_stale)
            return
        if current is not None and current.argv == argv and current.alive() and not restart:
            if reload:
                current.signal(signal.SIGHUP)  # dnsmasq re-reads its hosts file
            return
        fresh = Proc(name, argv, rt.dir / f"{name}.log", rt.dir / f"{name}.pid", marker, rt.ns)
        if current is None:
            if not restart and fresh.adopt():  # left running by a previous agent, same configuration
                setattr(rt, name, fresh)
                if reload or name == "dnsmasq":
                    fresh.signal(signal.SIGHUP)
                return
            await asyncio.to_thread(fresh.kill_stale)
        else:
            await asyncio.to_thread(current.stop)
        fresh.start()
        setattr(rt, name, fresh)

    async def _ensure_bridge(self, ip: str, rt: Runtime, l3: render.L3Conf) -> None:
        rt.warnings.extend(await ensure_bridge(l3.bridge, l3.physical_interface or "", l3.vlan))

    async def _ensure_namespace(self, ip: str, rt: Runtime, l3: render.L3Conf) -> None:
        fresh = False
        if not Path(f"/run/netns/{rt.ns}").exists():
            await run([ip, "netns", "add", rt.ns], ok_if="File exists")
            await run([ip, "-n", rt.ns, "link", "set", "dev", "lo", "up"])
            fresh = True
        if not Path(f"/sys/class/net/{rt.outer}").exists():
            await run([ip, "-n", rt.ns, "link", "del", INNER], check=False)
            await run([ip, "link", "add", rt.outer, "type", "veth", "peer", "name", INNER, "netns", rt.ns])
            await run([ip, "link", "set", "dev", rt.outer, "addrgenmode", "none"], check=False)
            fresh = True
        if _master(rt.outer) != l3.bridge:
            await run([ip, "link", "set", "dev", rt.outer, "master", l3.bridge, "up"])
        want = (l3.dhcp_ip, l3.prefix, rt.ns_mac)
        if fresh or rt.addr != want:
            await run([ip, "-n", rt.ns, "link", "set", "dev", INNER, "down"])
            await run([ip, "-n", rt.ns, "link", "set", "dev", INNER, "address", rt.ns_mac, "addrgenmode", "none"])
            await run([ip, "-n", rt.ns, "addr", "flush", "dev", INNER])
            await run([ip, "-n", rt.ns, "addr", "add", f"{l3.dhcp_ip}/{l3.prefix}", "dev", INNER])
            await run([ip, "-n", rt.ns, "addr", "add", f"{v.METADATA_IP}/32", "dev", INNER])
            await run([ip, "-n", rt.ns, "link", "set", "dev", INNER, "up"])
            await run([ip, "link", "set", "dev", rt.outer, "up"])
            rt.addr = want

    async def _release(self, rt: Runtime) -> None:
        for attr, name in (("dnsmasq", "dnsmasq"), ("metadata", "metadata")):
            p: Proc | None = getattr(rt, attr)
            if p is not None:
                setattr(rt, attr, None)
                await asyncio.to_thread(p.stop)
            else:
                stale = Proc(name, [], rt.dir / f"{name}.log", rt.dir / f"{name}.pid", str(rt.dir))
                await asyncio.to_thread(stale.kill_stale)
        ip, nft = tool("ip"), tool("nft")
        if nft:
            await run([nft, "delete", "table", "bridge", rt.table], check=False)
        if ip:
            if Path(f"/sys/class/net/{rt.outer}").exists():
                await run([ip, "link", "del", rt.outer], check=False)
            if Path(f"/run/netns/{rt.ns}").exists():
                await run([ip, "netns", "del", rt.ns], check=False)
        shutil.rmtree(rt.dir, ignore_errors=True)
        rt.nft, rt.addr = None, None

    # --- supervision ------------------------------------------------------------------------

    def _ensure_supervisor(self) -> None:
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISE_EVERY)
            for rt in list(self.runtimes.values()):
                if rt.lock.locked():
                    continue
                for p in (rt.dnsmasq, rt.metadata):
                    if p is None or not p.wanted or p.alive():
                        continue
                    p.restarts += 1
                    log.warning("%s of L3 network %s died; restarting it (restart %d)", p.name, rt.l3_uuid, p.restarts)
                    try:
                        p.start()
                    except OSError as err:
                        log.error("cannot restart %s of L3 network %s: %s", p.name, rt.l3_uuid, err)


def _applied(d: render.Desired) -> dict[str, Any]:
    """The applied state without userdata (that lives in the root-only metadata state)."""
    return {
        "hostUuid": d.host_uuid,
        "l3": {
            "uuid": d.l3.uuid,
            "bridge": d.l3.bridge,
            "physicalInterface": d.l3.physical_interface,
            "vlan": d.l3.vlan,
            "dhcpServerIp": d.l3.dhcp_ip,
            "netmask": d.l3.netmask,
            "gateway": d.l3.gateway,
            "dns": list(d.l3.dns),
            "dnsDomain": d.l3.domain,
            "services": sorted(d.l3.services),
        },
        "vms": [
            {"vmUuid": e.vm_uuid, "nicUuid": e.nic_uuid, "mac": e.mac, "ip": e.ip, "hostname": e.hostname}
            for e in d.vms
        ],
    }


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _master(dev: str) -> str | None:
    try:
        return os.path.basename(os.readlink(f"/sys/class/net/{dev}/master"))
    except OSError:
        return None


_USER: tuple[str, str] | None = None


def _dnsmasq_user(state_dir: Path) -> tuple[str, str]:
    """dnsmasq drops to ``nobody`` once started and re-reads its hosts file as that user: it runs
    as root only when ``nobody`` cannot reach the state directory (say a private temp dir)."""
    for d in [state_dir, *state_dir.parents]:
        try:
            if not os.stat(d).st_mode & 0o001:
                log.warning("%s is not searchable by others: dnsmasq runs as root", d)
                return ("root", "root")
        except OSError:
            return ("root", "root")
    global _USER
    if _USER is None:
        import grp
        import pwd

        try:
            pwd.getpwnam("nobody")
            group = "nogroup"
            try:
                grp.getgrnam(group)
            except KeyError:
                group = "nobody"
            _USER = ("nobody", group)
        except KeyError:
            _USER = ("root", "root")
    return _USER
