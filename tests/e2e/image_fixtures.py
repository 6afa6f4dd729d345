"""Fixtures and helpers for the tiny test guest image (images/build-tiny).

* ``tiny_image_dir`` (session): a directory holding tiny.qcow2 and tiny.iso.
  ``NIMBO_IMAGE_DIR`` names it; when that directory already holds both files
  they are used as they are.  Without the variable the images are built into
  ``<repo>/build/tiny-image`` and rebuilt only when a file under images/ is
  newer than them (the .deb downloads are cached in ``<dir>/.cache``).
* ``TinyVM``: boots one of the images with qemu-system-x86_64 under TCG,
  serial console on a log file (and writable through stdin), QMP on a unix
  socket.  With ``metadata=True`` it runs QEMU in a private network namespace
  (``unshare -n``) in which small HTTP servers answer as the DHCP server's
  metadata service (10.0.2.2 -> 127.0.0.1:80) and as the EC2 address
  169.254.169.254; nothing can leave that namespace.  Without it (or when no
  namespace can be made) slirp runs with ``restrict=on`` so the guest reaches
  nothing outside QEMU.  ``NIMBO_TINY_NETNS=0`` forces the latter.

Use from a test module with ``from image_fixtures import tiny_image_dir, TinyVM``
(the e2e directory is on sys.path under pytest's default import mode).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
BUILD_SCRIPT = IMAGES / "build-tiny"
DEFAULT_IMAGE_DIR = REPO / "build" / "tiny-image"
QEMU = "qemu-system-x86_64"

BUILD_TOOLS = ("apt-get", "dpkg-deb", "syslinux", "mcopy", "mkfs.vfat", "xorriso", "qemu-img")
BUILD_FILES = (
    "/usr/lib/syslinux/mbr/mbr.bin",
    "/usr/lib/syslinux/modules/bios/ldlinux.c32",
    "/usr/lib/ISOLINUX/isolinux.bin",
    "/usr/lib/ISOLINUX/isohdpfx.bin",
)

# What the namespace's metadata servers answer (see TinyVM(metadata=True)).
META_FILES = {
    "latest/meta-data/instance-id": "i-tinytest0001",
    "latest/meta-data/local-hostname": "tiny-e2e",
    "latest/meta-data/public-keys": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITinyTestKey e2e@nimbostack\n",
    "latest/user-data": "#cloud-config\nnimbo_test: 42\n",
}
EC2_FILES = {"latest/meta-data/instance-id": "i-ec2tinytest"}


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def missing_build_tools() -> list[str]:
    missing = [t for t in BUILD_TOOLS if not _which(t)]
    missing += [f for f in BUILD_FILES if not os.path.exists(f)]
    return missing


def _images_newer_than(path: Path) -> bool:
    stamp = path.stat().st_mtime
    for p in IMAGES.rglob("*"):
        if p.is_file() and p.stat().st_mtime > stamp:
            return True
    return False


def build_tiny_image(outdir: Path) -> None:
    proc = subprocess.run([str(BUILD_SCRIPT), str(outdir)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"images/build-tiny failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="session")
def tiny_image_dir() -> Path:
    env = os.environ.get("NIMBO_IMAGE_DIR")
    outdir = Path(env) if env else DEFAULT_IMAGE_DIR
    qcow2, iso = outdir / "tiny.qcow2", outdir / "tiny.iso"
    have = qcow2.is_file() and iso.is_file()
    if have and (env or not _images_newer_than(qcow2)):
        return outdir
    missing = missing_build_tools()
    if missing:
        pytest.skip(
            "cannot build the tiny guest image, missing: "
            + " ".join(missing)
            + " (apt-get install $(grep -v '^#' images/packages.txt))"
        )
    outdir.mkdir(parents=True, exist_ok=True)
    build_tiny_image(outdir)
    return outdir


def require_qemu() -> str:
    path = shutil.which(QEMU)
    if not path:
        pytest.skip(f"{QEMU} is not installed (apt-get install qemu-system-x86) - cannot boot the tiny guest")
    return path


_NETNS_OK: bool | None = None


def netns_available() -> bool:
    """True when `unshare -n` works here and `ip` exists (root or CAP_SYS_ADMIN)."""
    global _NETNS_OK
    if _NETNS_OK is None:
        ok = os.environ.get("NIMBO_TINY_NETNS", "1") != "0"
        ok = ok and bool(shutil.which("unshare")) and bool(_which("ip"))
        if ok:
            try:
                r = subprocess.run(
                    ["unshare", "-n", "--", _which("ip"), "link", "set", "lo", "up"], capture_output=True, timeout=10
                )
                ok = r.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        _NETNS_OK = ok
    return _NETNS_OK


# Runs inside the private network namespace: loopback up, 169.254.169.254 on
# lo, two HTTP servers, then QEMU; exits with QEMU's exit code.
_NETNS_BOOTSTRAP = r"""
import functools, http.server, subprocess, sys, threading
ip, meta, ec2 = sys.argv[1:4]
qemu = sys.argv[4:]
subprocess.run([ip, "link", "set", "lo", "up"], check=True)
subprocess.run([ip, "addr", "add", "169.254.169.254/32", "dev", "lo"], check=True)
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass
for addr, root in (("127.0.0.1", meta), ("169.254.169.254", ec2)):
    srv = http.server.ThreadingHTTPServer((addr, 80), functools.partial(Quiet, directory=root))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
sys.exit(subprocess.call(qemu))
"""


class TinyVM:
    """One QEMU (TCG) run of the tiny guest; serial log at ``self.serial_path``."""

    def __init__(
        self,
        workdir: Path,
        *,
        disk: Path | None = None,
        iso: Path | None = None,
        disk_format: str = "qcow2",
        snapshot: bool = True,
        boot_once_cdrom: bool = False,
        mem_mb: int = 256,
        metadata: bool = False,
        hostname: str = "tinyhost",
        extra_args: tuple[str, ...] = (),
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_path = self.workdir / "serial.log"
        self.qmp_path = self.workdir / "qmp.sock"
        self.disk, self.iso = disk, iso
        self.disk_format, self.snapshot = disk_format, snapshot
        self.boot_once_cdrom = boot_once_cdrom
        self.mem_mb, self.hostname = mem_mb, hostname
        self.metadata = metadata and netns_available()
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self._pos = 0
        self.started_at = 0.0

    # ---------------------------------------------------------------- start
    def _qemu_cmd(self) -> list[str]:
        netdev = f"user,id=n0,hostname={self.hostname}"
        if not self.metadata:
            netdev += ",restrict=on"
        cmd = [
            require_qemu(),
            "-machine",
            "accel=tcg",
            "-m",
            str(self.mem_mb),
            "-smp",
            "1",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-netdev",
            netdev,
            "-device",
            "virtio-net-pci,netdev=n0",
            "-no-user-config",
        ]
        if self.disk is not None:
            drive = f"file={self.disk},if=virtio,format={self.disk_format}"
            if self.snapshot:
                drive += ",snapshot=on"
            cmd += ["-drive", drive]
        if self.iso is not None:
            cmd += ["-drive", f"file={self.iso},media=cdrom,readonly=on"]
        cmd += ["-boot", "once=d,order=c" if self.boot_once_cdrom else "order=c"]
        return cmd + list(self.extra_args)

    def _write_tree(self, root: Path, files: dict[str, str]) -> None:
        for rel, text in files.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)

    def start(self) -> TinyVM:
        cmd = self._qemu_cmd()
        if self.metadata:
            meta, ec2 = self.workdir / "meta", self.workdir / "ec2"
            self._write_tree(meta, META_FILES)
            self._write_tree(ec2, EC2_FILES)
            cmd = [
                "unshare",
                "-n",
                "--",
                sys.executable,
                "-c",
                _NETNS_BOOTSTRAP,
                _which("ip"),
                str(meta),
                str(ec2),
                *cmd,
            ]
        self.serial_path.unlink(missing_ok=True)
        self.qmp_path.unlink(missing_ok=True)
        self._log = open(self.serial_path, "wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    # ------------------------------------------------------------- console
    def log(self) -> str:
        return self.serial_path.read_bytes().decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """Wait for PATTERN in the serial log after the previous match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            m = rx.search(text, self._pos)
            if m:
                self._pos = m.end()
                return m
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited (rc={self.proc.returncode}) before {pattern!r}:\n" + text[-4000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} within {timeout}s on the serial console:\n" + text[-4000:])
            time.sleep(0.1)

    def send(self, text: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    # ----------------------------------------------------------------- QMP
    def qmp(self, execute: str, **arguments) -> dict:
        deadline = time.monotonic() + 10
        while not self.qmp_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.qmp_path))
            f = s.makefile("rwb")
            json.loads(f.readline())  # greeting
            for req in (
                {"execute": "qmp_capabilities"},
                {"execute": execute, **({"arguments": arguments} if arguments else {})},
            ):
                f.write(json.dumps(req).encode() + b"\n")
                f.flush()
                while True:
                    resp = json.loads(f.readline())
                    if "event" not in resp:
                        break
            if "error" in resp:
                raise AssertionError(f"QMP {execute}: {resp['error']}")
            return resp

    def hmp(self, command: str) -> str:
        return self.qmp("human-monitor-command", **{"command-line": command}).get("return", "")

    # ---------------------------------------------------------------- stop
    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if getattr(self, "_log", None):
            self._log.close()
