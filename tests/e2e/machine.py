"""Other machines on this one, for what two hosts on one libvirtd cannot do: live migration.

A ``Wire`` is a bridge on this machine with an address (the management node listens there); a
``Machine`` is a network namespace plugged into the wire by a veth pair, plus a private mount and
UTS namespace in which it runs its own virtlogd,
its own libvirtd (listening on TCP as a KVM host's does, with its own host UUID and hostname) and
a nimbostack libvirt agent. The new namespaces hide this machine's /run/libvirt, /var/lib/libvirt,
/var/cache/libvirt, /var/log/libvirt, /run/netns, /run/nimbostack and /etc/libvirt, so the two libvirtds and the
two agents' network namespaces do not meet; every other path (test directories, images, shared
storage) is the same file on both, like an NFS mount. Its guests' QEMU processes run in its
network namespace, behind its own bridges, and a migration stream crosses the veth pair.

Everything they make they remove on ``close()``: processes (every pid in the machine's network
namespace), the namespace, the veth pair and the bridge; the private mounts go with the last
process. Addresses come from 198.18.0.0/15 and never leave this machine."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

NIMBOSTACK = Path(sys.executable).with_name("nimbostack")

# Runs inside the new mount and UTS namespaces (already in the network namespace).
_BOOT = r"""
set -eu
hostname "$M_NAME"
for d in /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt /run/netns /run/nimbostack ${M_PRIVATE:-}; do
    mkdir -p "$d"
    mount -t tmpfs "nimbo-$M_NAME" "$d"
done
mount --bind "$M_ETC" /etc/libvirt
[ -z "${M_SHADOW:-}" ] || mount --bind "$M_SHADOW" /etc/shadow
mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu
ip link set lo up
virtlogd -d -p /run/libvirt/virtlogd.pid
libvirtd -d -l -p /run/libvirt/libvirtd.pid
n=0
until virsh -c qemu:///system version >/dev/null 2>&1; do
    n=$((n + 1)); [ "$n" -lt 100 ] || { echo "libvirtd did not start" >&2; exit 1; }
    sleep 0.1
done
exec "$@"
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Wire:
    """A switch between this machine and the ``Machine``s: a bridge holding ``ip``/24."""

    def __init__(self, ip: str = "198.18.200.1") -> None:
        self.ip = ip
        self.bridge = f"nw{uuid.uuid4().hex[:8]}"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


class Machine:
    """A KVM host of its own: libvirtd (TCP, own host UUID) and a nimbostack agent at ``ip``."""

    # what the machine's first process waits for: its agent's port
    main_port: int | None = None

    def __init__(self, root: Path, wire: Wire, ip: str, node_data: Path, port: int = 7070) -> None:
        """``node_data``: the management node's data dir, whose CA issues the agent's credentials."""
        tag = uuid.uuid4().hex[:6]
        self.name = f"nimbo-m{tag}"
        self.wire, self.ip, self.port = wire, ip, port
        self.host_uuid = str(uuid.uuid4())
        self.veth = f"nm{tag}"
        self.root = root
        self.state = root / "agent"
        self.log = root / "machine.log"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self._prepare(node_data)
        try:
            self._network()
            self._start()
        except BaseException:
            self.close()
            raise

    def _prepare(self, node_data: Path) -> None:
        subprocess.run([str(NIMBOSTACK), "agent-credentials", "--data-dir", str(node_data), "--address",
                        f"{self.ip}:{self.port}", "--out", str(self.state / "agent.pem")], check=True)

    @property
    def libvirt_uri(self) -> str:
        return f"qemu+tcp://{self.ip}/system"

    def _network(self) -> None:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        _ip("link", "set", self.veth, "master", self.wire.bridge, "up")
        _ip("-n", self.name, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        _ip("-n", self.name, "link", "set", "eth0", "up")

    def _start(self) -> None:
        etc = self.root / "etc-libvirt"
        shutil.copytree("/etc/libvirt", etc, symlinks=True)
        # its own host UUID: libvirt refuses to migrate a domain to the host it runs on
        (etc / "libvirtd.conf").write_text(self._libvirtd_conf())
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "M_NAME": self.name,
            "M_ETC": str(etc),
            **self._boot_env(),
        }
        if os.environ.get("PYTHONPATH"):  # the agent runs the code under test (a worktree's src)
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        self._spawn(["ip", "netns", "exec", self.name, "unshare", "--mount", "--uts", "--propagation", "private",
                     "sh", "-c", _BOOT, "boot", *self._main_args()], env)

    def _libvirtd_conf(self) -> str:
        return (f'listen_tls = 0\nlisten_tcp = 1\nauth_tcp = "none"\nlisten_addr = "{self.ip}"\n'
                f'host_uuid = "{self.host_uuid}"\n')

    def _boot_env(self) -> dict[str, str]:
        return {}

    def _main_args(self) -> list[str]:
        return self._agent_args()

    def _agent_args(self) -> list[str]:
        return [str(NIMBOSTACK), "agent", "--driver", "libvirt", "--listen", self.ip, "--port", str(self.port),
                "--host-ip", self.ip, "--state-dir", str(self.state), "--domain-type", "qemu"]

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Run ``argv`` (ending in the agent, by exec) and wait until the agent answers."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"machine {self.name} did not start: {self.log.read_text()[-2000:]}")
            try:  # inside the machine's network namespace: reachable over the test's bridge only
                socket.create_connection((self.ip, self.main_port or self.port), timeout=1).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent of machine {self.name} did not answer: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def kill_agent(self) -> None:
        """SIGKILL the agent; libvirtd and the guests run on, as on a real host."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def freeze_agent(self) -> None:
        """SIGSTOP the agent: requests reach its socket and wait, unanswered (kill it next)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def start_agent(self) -> None:
        """The agent again (after ``kill_agent``), in the machine's namespaces."""
        self._spawn(["nsenter", "-t", str(self._libvirtd()), "-m", "-u", "-n", *self._agent_args()])

    def revive(self) -> bool:
        """An agent killed or frozen is replaced by a new one; True when that was needed."""
        assert self.proc is not None
        if self.proc.poll() is None:
            state = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "T":
                return False
            self.kill_agent()
        self.start_agent()
        return True

    def _libvirtd(self) -> int:
        return next(p for p in self.pids() if Path(f"/proc/{p}/comm").read_text().strip() == "libvirtd")

    def sh(self, command: str) -> str:
        """A shell command's output, run in the machine's namespaces (its own /run, network, ...)."""
        argv = ["nsenter", "-t", str(self._libvirtd()), "-m", "-u", "-n", "sh", "-c", command]
        return subprocess.run(argv, capture_output=True, text=True).stdout

    def virsh(self, *args: str) -> subprocess.CompletedProcess[str]:
        """virsh on this machine's libvirtd, over TCP as the migration source reaches it."""
        return subprocess.run(["virsh", "-c", self.libvirt_uri, *args], capture_output=True, text=True)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def _everything(self, uts_ns: str | None) -> list[int]:
        """The machine's processes: those on its network, and those of its UTS namespace on a
        network (and mounts) of their own: the Flat provider's dnsmasq and metadata server."""
        pids = set(self.pids())
        if uts_ns:
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        if os.readlink(entry / "ns" / "uts") == uts_ns:
                            pids.add(int(entry.name))
                    except OSError:
                        pass
        return sorted(pids)

    def close(self) -> None:
        try:
            uts_ns: str | None = os.readlink(f"/proc/{self._libvirtd()}/ns/uts")
        except (StopIteration, OSError):
            uts_ns = None
        for sig in ("TERM", "KILL"):
            pids = self._everything(uts_ns)
            if not pids:
                break
            subprocess.run(["kill", f"-{sig}", *map(str, pids)], capture_output=True)
            deadline = time.monotonic() + 10
            while self._everything(uts_ns) and time.monotonic() < deadline:
                time.sleep(0.1)
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)


class SshMachine(Machine):
    """A KVM host as an operator hands it over: sshd (root's password ``PASSWORD``), libvirtd not
    listening on TCP, no agent. Its /root, /opt/nimbostack-agent, /var/lib/nimbostack-agent and
    /etc/systemd/system are its own (and /etc/shadow a copy), so what a deployment installs there
    stays inside the machine; packages are this machine's (the same dpkg database)."""

    PASSWORD = "nimbo-deploy-test"
    main_port = 22
    PRIVATE = "/root /opt/nimbostack-agent /var/lib/nimbostack-agent /etc/systemd/system"

    def _prepare(self, node_data: Path) -> None:
        ssh = self.root / "sshd"
        ssh.mkdir(exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "host_key")], check=True)
        (ssh / "sshd_config").write_text(
            f"ListenAddress {self.ip}\nPort 22\nHostKey {ssh / 'host_key'}\nPidFile {ssh / 'sshd.pid'}\n"
            "PermitRootLogin yes\nPasswordAuthentication yes\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\nSubsystem sftp internal-sftp\n"
        )
        hashed = subprocess.run(["openssl", "passwd", "-6", self.PASSWORD], capture_output=True, text=True,
                                check=True).stdout.strip()
        lines = [f"root:{hashed}:20000:0:99999:7:::" if line.startswith("root:") else line
                 for line in Path("/etc/shadow").read_text().splitlines()]
        shadow = ssh / "shadow"
        shadow.write_text("\n".join(lines) + "\n")
        shadow.chmod(0o640)

    def _libvirtd_conf(self) -> str:
        # no TCP listener (the deployment adds it), and no TLS one, which would need certificates
        return f'listen_tls = 0\nhost_uuid = "{self.host_uuid}"\n'

    def _boot_env(self) -> dict[str, str]:
        return {"M_PRIVATE": self.PRIVATE, "M_SHADOW": str(self.root / "sshd" / "shadow")}

    def _main_args(self) -> list[str]:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        return ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.root / "sshd" / "sshd_config")]

    def agent_pid(self) -> int | None:
        out = self.sh("cat /var/lib/nimbostack-agent/agent.pid 2>/dev/null").strip()
        return int(out) if out.isdigit() else None
