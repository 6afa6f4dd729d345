"""SSH deployment of a host agent (compute/deploy.py): AddKVMHost of a fresh host, ReconnectHost of an
up-to-date one, and ReconnectHost of a host whose agent died (redeployed with the node's key).
Targets: fresh < 120 s, up-to-date reconnect < 5 s.

The host is made here, on this machine (root): a network namespace behind a bridge (198.18.202.0/24,
never leaving the machine) with its own mount and UTS namespaces, its own libvirtd (no TCP listener
yet) and a real sshd whose root password is known; its /root, /opt/nimbostack-agent,
/var/lib/nimbostack-agent and /etc/systemd/system are private tmpfs, so the deployment leaves
nothing on this machine. Debian's openssh-server must be installed (scripts/ssh-packages.txt).

    .venv/bin/python bench/deploy.py
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from nimbostack.harness import Api, Running

PASSWORD = "nimbo-bench-pw"
NODE_IP, HOST_IP = "198.18.202.1", "198.18.202.2"
PRIVATE = "/root /opt/nimbostack-agent /var/lib/nimbostack-agent /etc/systemd/system"
BOOT = r"""
set -eu
hostname nimbo-bench
for d in /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt /run/nimbostack $PRIVATE; do
    mkdir -p "$d"; mount -t tmpfs nimbo-bench "$d"
done
mount --bind "$ETC" /etc/libvirt
mount --bind "$SHADOW" /etc/shadow
mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /run/sshd
ip link set lo up
virtlogd -d -p /run/libvirt/virtlogd.pid
libvirtd -d -l -p /run/libvirt/libvirtd.pid
exec /usr/sbin/sshd -D -e -f "$SSHD_CONFIG"
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class Host:
    def __init__(self, root: Path) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns, self.bridge, self.veth = f"nimbo-b{tag}", f"nb{tag}", f"nv{tag}"
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{NODE_IP}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        sh("ip", "link", "set", self.veth, "master", self.bridge, "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{HOST_IP}/24", "dev", "eth0")
        sh("ip", "-n", self.ns, "link", "set", "eth0", "up")
        etc = root / "etc-libvirt"
        shutil.copytree("/etc/libvirt", etc, symlinks=True)
        (etc / "libvirtd.conf").write_text(f'listen_tls = 0\nhost_uuid = "{uuid.uuid4()}"\n')
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "host_key"))
        (root / "sshd_config").write_text(
            f"ListenAddress {HOST_IP}\nHostKey {root / 'host_key'}\nPidFile {root / 'sshd.pid'}\n"
            "PermitRootLogin yes\nPasswordAuthentication yes\nUsePAM no\nSubsystem sftp internal-sftp\n"
            # its /root is a tmpfs (mode 1777), which StrictModes would refuse to read keys in
            "StrictModes no\n")
        hashed = subprocess.run(["openssl", "passwd", "-6", PASSWORD], capture_output=True, text=True,
                                check=True).stdout.strip()
        shadow = [f"root:{hashed}:20000:0:99999:7:::" if line.startswith("root:") else line
                  for line in Path("/etc/shadow").read_text().splitlines()]
        (root / "shadow").write_text("\n".join(shadow) + "\n")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PRIVATE": PRIVATE, "ETC": str(etc),
               "SHADOW": str(root / "shadow"), "SSHD_CONFIG": str(root / "sshd_config")}
        with (root / "host.log").open("wb") as out:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "unshare", "--mount", "--uts",
                                          "--propagation", "private", "sh", "-c", BOOT], env=env,
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection((HOST_IP, 22), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError((root / "host.log").read_text()) from None
                time.sleep(0.2)

    def inside(self, command: str) -> None:
        """A shell command in the host's namespaces (those of its sshd, the first process)."""
        subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", "-u", "-n", "sh", "-c", command],
                       capture_output=True)

    def pids(self) -> list[str]:
        return subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout.split()

    def close(self) -> None:
        for sig in ("TERM", "KILL"):
            if self.pids():
                subprocess.run(["kill", f"-{sig}", *self.pids()], capture_output=True)
                time.sleep(1)
        self.proc.wait(10)
        for argv in (["ip", "netns", "del", self.ns], ["ip", "link", "del", self.veth],
                     ["ip", "link", "del", self.bridge]):
            subprocess.run(argv, capture_output=True)


def timed(fn: object, *args: object, **kwargs: object) -> tuple[float, object]:
    began = time.monotonic()
    out = fn(*args, **kwargs)  # type: ignore[operator]
    return time.monotonic() - began, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reconnects", type=int, default=5, help="ReconnectHost calls of the up-to-date host")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nimbo-bench-deploy-") as tmp:
        root = Path(tmp)
        host = Host(root)
        node = None
        try:
            node = Running(root / "data", listen=NODE_IP)
            a = Api(node.url)
            a.login()
            zone = a.call("CreateZone", name="z")["inventory"]["uuid"]
            cluster = a.call("CreateCluster", name="c", zoneUuid=zone, hypervisorType="KVM")["inventory"]["uuid"]
            fresh, reply = timed(a.call, "AddKVMHost", name="bench", managementIp=HOST_IP, username="root",
                                 password=PASSWORD, clusterUuid=cluster)
            host_uuid = reply["inventory"]["uuid"]  # type: ignore[index]
            print(f"deploy of a fresh host (AddKVMHost over SSH): {fresh:.1f} s (target < 120 s)")
            again = sorted(timed(a.call, "ReconnectHost", uuid=host_uuid)[0] for _ in range(max(1, args.reconnects)))
            print(f"reconnect of an up-to-date host (ReconnectHost, no deployment): median "
                  f"{again[len(again) // 2]:.2f} s, max {again[-1]:.2f} s (target < 5 s)")
            log = node.data_dir / "logs" / "deploy" / f"{HOST_IP}.log"
            assert log.read_text().count("--- deploying") == 1, "an up-to-date host was redeployed"
            host.inside("kill $(cat /var/lib/nimbostack-agent/agent.pid)")
            time.sleep(1)
            dead, _ = timed(a.call, "ReconnectHost", uuid=host_uuid)
            print(f"redeploy of a host whose agent died (ReconnectHost with the node's key): {dead:.1f} s")
            print("tasks of the fresh deploy:")
            for line in log.read_text().split("--- deploying")[1].splitlines():
                if ": done in" in line:
                    print("   ", line.split(" ", 1)[1][:110])
        finally:
            if node is not None:
                node.stop()
            host.close()


if __name__ == "__main__":
    main()
