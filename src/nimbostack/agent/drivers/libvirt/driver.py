"""The libvirt/QEMU hypervisor driver of the host agent.

Every blocking libvirt call runs in a worker thread of its own pool; libvirt's own
default event loop runs in one daemon thread per process so that lifecycle events and keepalive
work, and events are handed to the asyncio loop with ``call_soon_threadsafe``.

Domains are named ``nimbo-<32 hex vm uuid>`` and carry the VM uuid as their libvirt UUID, so a
domain is recognised as ours from its name and UUID alone (no extra round trip per domain).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import subprocess
import tempfile
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import libvirt

from nimbostack.agent.driver import DriverError, StateListener
from nimbostack.wire import PAUSED, REBOOTED, RUNNING, STOPPED, ConsoleAddress, DiskSpec, HostFacts, NicSpec, VmSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

DOMAIN_PREFIX = "nimbo-"
METADATA_NS = "http://nimbostack.io/xmlns/libvirt/vm/1.0"
METADATA_PREFIX = "nimbo"
ARCH = "x86_64"
MACHINE = "pc"

CACHE_MODES = ("none", "writethrough", "writeback", "directsync", "unsafe")
DISK_FORMATS = ("qcow2", "raw")
CONSOLE_MODES = ("vnc", "spice")
CPU_MODES = ("none", "host-model", "host-passthrough")
BOOT_DEVICES = {"HardDisk": "hd", "CdRom": "cdrom", "Network": "network"}

# The cdrom is created with every domain (empty when there is no ISO) because an IDE drive
# cannot be hot-plugged: only its media can be changed on a running guest.
CDROM_TARGET = "hdc"
CDROM_BUS = "ide"

MEDIA_CHANGE_ATTEMPTS = 12
# How long detach_disk waits for the guest to release a hot-unplugged disk.
DETACH_TIMEOUT = 20.0
# Guests that were still booting when the ACPI button was pressed never saw it; press again.
SHUTDOWN_RESEND_INTERVAL = 5.0
STOP_POLL_INTERVAL = 0.2

ET.register_namespace(METADATA_PREFIX, METADATA_NS)

_STATE_OF_EVENT: dict[int, str] = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: RUNNING,
    libvirt.VIR_DOMAIN_EVENT_RESUMED: RUNNING,
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: PAUSED,
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: PAUSED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED: STOPPED,
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: STOPPED,
    libvirt.VIR_DOMAIN_EVENT_CRASHED: STOPPED,
}

_STATE_OF_DOMAIN: dict[int, str] = {
    libvirt.VIR_DOMAIN_NOSTATE: STOPPED,
    libvirt.VIR_DOMAIN_RUNNING: RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PAUSED,
    # The guest has powered off and libvirt is ending QEMU, which takes a second or more: as the
    # SHUTDOWN event, that is Stopped - except within our own ACPI reboot (see _state_of_domain).
    libvirt.VIR_DOMAIN_SHUTDOWN: STOPPED,
    libvirt.VIR_DOMAIN_SHUTOFF: STOPPED,
    libvirt.VIR_DOMAIN_CRASHED: STOPPED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PAUSED,
}

# Guests yield the CPUs to the host's own work when both want them: a guest busy at 100% (every
# guest while it boots under TCG) must not slow the agent's answers to pings, DHCP and metadata,
# or the start of the next guest. Nice 5 gives the host ~3x a guest's share under contention and
# changes nothing on an idle host. Applied to every QEMU thread when the domain starts (also a
# domain started outside the agent, or arriving by migration).
GUEST_NICE = 5
QEMU_PID_DIR = "/run/libvirt/qemu"

# Threads for blocking libvirt calls, apart from asyncio's default pool (CPUs + 4 threads), which
# image copies and fsyncs hold for minutes: a VM start or a state query must not queue behind
# them. libvirtd serves 20 calls at a time by default.
_LIBVIRT_THREADS = ThreadPoolExecutor(max_workers=20, thread_name_prefix="libvirt")

# A live migration's source pauses and stops the domain: not a state change of the VM.
_MIGRATION_EVENTS = {
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED),
    (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED),
}

_CONNECTION_ERRORS = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_AUTH_FAILED,
}


# --------------------------------------------------------------------------- libvirt plumbing


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error on stderr by default; ours become DriverErrors instead."""


libvirt.registerErrorHandler(_ignore_libvirt_error, None)

_event_loop_lock = threading.Lock()
_event_loop_thread: threading.Thread | None = None


def _run_libvirt_event_loop() -> None:
    while True:
        try:
            if libvirt.virEventRunDefaultImpl() < 0:
                time.sleep(0.1)
        except Exception:  # pragma: no cover - the loop must survive a bad callback
            log.exception("libvirt event loop iteration failed")
            time.sleep(0.1)


def _ensure_libvirt_event_loop() -> None:
    """Start libvirt's default event loop once per process; it must exist before ``open``."""
    global _event_loop_thread
    with _event_loop_lock:
        if _event_loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        thread = threading.Thread(target=_run_libvirt_event_loop, name="libvirt-events", daemon=True)
        thread.start()
        _event_loop_thread = thread


def _is_connection_error(err: libvirt.libvirtError) -> bool:
    code = err.get_error_code()
    if code in _CONNECTION_ERRORS:
        return True
    return code == libvirt.VIR_ERR_SYSTEM_ERROR and err.get_error_domain() == libvirt.VIR_FROM_RPC


def _translate(err: libvirt.libvirtError, action: str) -> DriverError:
    code = err.get_error_code()
    message = (err.get_error_message() or str(err)).strip()
    details = f"libvirt error code {code} (domain {err.get_error_domain()})"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DriverError("VM_NOT_FOUND", f"Could not {action}: the domain does not exist on this host.", message)
    if _is_connection_error(err):
        return DriverError(
            "LIBVIRT_UNAVAILABLE", f"Could not {action}: the connection to libvirtd failed: {message}", details
        )
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return DriverError("INVALID_STATE", f"Could not {action}: {message}", details)
    if code in (libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_ERR_AGENT_UNRESPONSIVE):
        return DriverError("LIBVIRT_TIMEOUT", f"Could not {action}: {message}", details)
    return DriverError("LIBVIRT_ERROR", f"Could not {action}: {message}", details)


# ------------------------------------------------------------------------------ naming helpers


def vm_hex(vm_uuid: str) -> str:
    """The 32-hex form of a VM uuid (ZStack style), accepting the dashed form too."""
    try:
        return uuidlib.UUID(vm_uuid).hex
    except (ValueError, TypeError, AttributeError):
        raise DriverError("INVALID_ARGUMENT", f"VM uuid {vm_uuid!r} is not a UUID.") from None


def domain_name(vm_uuid: str) -> str:
    return DOMAIN_PREFIX + vm_hex(vm_uuid)


def vm_uuid_of_domain(name: str, domain_uuid: str) -> str | None:
    """The VM uuid of a nimbostack domain, or None for domains someone else defined."""
    if not name.startswith(DOMAIN_PREFIX):
        return None
    hex_part = name[len(DOMAIN_PREFIX) :]
    try:
        if uuidlib.UUID(hex_part).hex != hex_part or uuidlib.UUID(domain_uuid).hex != hex_part:
            return None
    except ValueError:
        return None
    return hex_part


def disk_target(device_id: int) -> str:
    """vda, vdb, ..., vdz, vdaa, ... the way libvirt numbers disk names."""
    if device_id < 0:
        raise DriverError("INVALID_ARGUMENT", f"Disk device id {device_id} is negative.")
    suffix = ""
    n = device_id
    while True:
        suffix = chr(ord("a") + n % 26) + suffix
        n = n // 26 - 1
        if n < 0:
            return "vd" + suffix


def nic_target(nic: NicSpec) -> str:
    """Tap device name: stable per NIC so firewall rules can name it; within IFNAMSIZ (15)."""
    hex_part = "".join(c for c in nic.uuid.lower() if c in "0123456789abcdef")[:8]
    if not hex_part:
        raise DriverError("INVALID_ARGUMENT", f"NIC uuid {nic.uuid!r} has no hex digits to name its tap.")
    return f"vnic{hex_part}"


# ---------------------------------------------------------------------------------- domain XML


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def disk_element(disk: DiskSpec) -> ET.Element:
    if disk.cache_mode not in CACHE_MODES:
        raise DriverError(
            "INVALID_ARGUMENT", f"Disk cache mode {disk.cache_mode!r} is not one of {', '.join(CACHE_MODES)}."
        )
    if disk.format not in DISK_FORMATS:
        raise DriverError("INVALID_ARGUMENT", f"Disk format {disk.format!r} is not one of {', '.join(DISK_FORMATS)}.")
    el = ET.Element("disk", {"type": "file", "device": "disk"})
    _sub(el, "driver", name="qemu", type=disk.format, cache=disk.cache_mode)
    _sub(el, "source", file=disk.path)
    _sub(el, "target", dev=disk_target(disk.device_id), bus="virtio")
    # virtio-blk serials hold 20 bytes; the volume uuid prefix lets a guest find /dev/disk/by-id.
    serial = "".join(c for c in disk.volume_uuid if c.isalnum())[:20]
    if serial:
        _sub(el, "serial", serial)
    return el


def cdrom_element(iso_path: str | None, target: str = CDROM_TARGET, bus: str = CDROM_BUS) -> ET.Element:
    el = ET.Element("disk", {"type": "file", "device": "cdrom"})
    _sub(el, "driver", name="qemu", type="raw")
    if iso_path:
        _sub(el, "source", file=iso_path)
    _sub(el, "target", dev=target, bus=bus)
    _sub(el, "readonly")
    return el


def interface_element(nic: NicSpec) -> ET.Element:
    el = ET.Element("interface", {"type": "bridge"})
    _sub(el, "mac", address=nic.mac)
    _sub(el, "source", bridge=nic.bridge)
    _sub(el, "target", dev=nic_target(nic))
    _sub(el, "model", type="virtio")
    return el


def build_domain_xml(
    spec: VmSpec,
    domain_type: str,
    console_listen: str = "0.0.0.0",
    video_model: str | None = None,
    owner: str | None = None,
) -> str:
    """The libvirt domain XML of ``spec``. Built with ElementTree so that any VM name, path or
    bridge is escaped rather than interpreted."""
    vm = vm_hex(spec.uuid)
    if spec.cpu_num < 1:
        raise DriverError("INVALID_ARGUMENT", f"VM {vm} needs at least one vCPU, got {spec.cpu_num}.")
    if spec.memory < 1 << 20:
        raise DriverError("INVALID_ARGUMENT", f"VM {vm} needs at least 1 MiB of memory, got {spec.memory}.")
    if spec.console_mode not in CONSOLE_MODES:
        raise DriverError(
            "INVALID_ARGUMENT", f"Console mode {spec.console_mode!r} is not one of {', '.join(CONSOLE_MODES)}."
        )
    if spec.cpu_mode not in CPU_MODES:
        raise DriverError("INVALID_ARGUMENT", f"CPU mode {spec.cpu_mode!r} is not one of {', '.join(CPU_MODES)}.")
    dashed = str(uuidlib.UUID(vm))

    dom = ET.Element("domain", {"type": domain_type})
    _sub(dom, "name", DOMAIN_PREFIX + vm)
    _sub(dom, "uuid", dashed)
    # libvirt refuses newlines in <title>; the exact name is kept in the metadata.
    _sub(dom, "title", " ".join(spec.name.splitlines()) or vm)
    metadata = _sub(dom, "metadata")
    instance = _sub(metadata, f"{{{METADATA_NS}}}instance")
    _sub(instance, f"{{{METADATA_NS}}}uuid", vm)
    _sub(instance, f"{{{METADATA_NS}}}name", spec.name)
    if owner:  # the host (agent) the domain was started for: several agents may share a libvirtd
        _sub(instance, f"{{{METADATA_NS}}}host", owner)

    kib = str(max(1, spec.memory // 1024))
    _sub(dom, "memory", kib, unit="KiB")
    _sub(dom, "currentMemory", kib, unit="KiB")
    _sub(dom, "vcpu", str(spec.cpu_num), placement="static")

    sysinfo = _sub(dom, "sysinfo", type="smbios")
    system = _sub(sysinfo, "system")
    _sub(system, "entry", "NimboStack", name="manufacturer")
    _sub(system, "entry", spec.smbios_product, name="product")
    _sub(system, "entry", vm, name="serial")
    _sub(system, "entry", dashed, name="uuid")

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch=ARCH, machine=MACHINE)
    seen: set[str] = set()
    for item in spec.boot_order or ["HardDisk"]:
        dev = BOOT_DEVICES.get(item)
        if dev is None:
            raise DriverError("INVALID_ARGUMENT", f"Boot device {item!r} is not one of {', '.join(BOOT_DEVICES)}.")
        if dev not in seen:
            seen.add(dev)
            _sub(os_el, "boot", dev=dev)
    _sub(os_el, "smbios", mode="sysinfo")

    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")

    if spec.cpu_mode != "none":
        cpu = _sub(dom, "cpu", mode=spec.cpu_mode)
        if spec.cpu_mode == "host-passthrough":
            cpu.set("check", "none")

    clock = _sub(dom, "clock", offset="utc")
    _sub(clock, "timer", name="rtc", tickpolicy="catchup")
    _sub(clock, "timer", name="pit", tickpolicy="delay")
    _sub(clock, "timer", name="hpet", present="no")

    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    pm = _sub(dom, "pm")
    # A suspended-to-RAM guest looks hung to users; the cloud offers pause instead.
    _sub(pm, "suspend-to-mem", enabled="no")
    _sub(pm, "suspend-to-disk", enabled="no")

    devices = _sub(dom, "devices")
    targets: set[str] = set()
    for disk in sorted(spec.disks, key=lambda d: d.device_id):
        el = disk_element(disk)
        target = disk_target(disk.device_id)
        if target in targets:
            raise DriverError("INVALID_ARGUMENT", f"Two disks of VM {vm} use device id {disk.device_id}.")
        targets.add(target)
        devices.append(el)
    devices.append(cdrom_element(spec.iso_path))

    taps: set[str] = set()
    for nic in sorted(spec.nics, key=lambda n: n.device_id):
        el = interface_element(nic)
        tap = nic_target(nic)
        if tap in taps:
            raise DriverError("INVALID_ARGUMENT", f"Two NICs of VM {vm} map to the tap name {tap}.")
        taps.add(tap)
        devices.append(el)

    serial = _sub(devices, "serial", type="pty")
    if spec.console_log:
        # A pty keeps `virsh console` usable while everything the guest prints is also logged.
        _sub(serial, "log", file=spec.console_log, append="off")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")

    graphics = _sub(devices, "graphics", type=spec.console_mode, autoport="yes", listen=console_listen)
    _sub(graphics, "listen", type="address", address=console_listen)
    video = _sub(devices, "video")
    model = video_model or ("qxl" if spec.console_mode == "spice" else "vga")
    _sub(video, "model", type=model, heads="1", primary="yes")
    # An absolute pointer keeps the VNC/SPICE mouse in sync with the guest's.
    _sub(devices, "input", type="tablet", bus="usb")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    _sub(devices, "memballoon", model="virtio")
    return ET.tostring(dom, encoding="unicode")


# ---------------------------------------------------------------------------- KVM usability

# A 64 KiB PC firmware image that switches to 32-bit protected mode, counts down 10 million
# iterations of `dec; jnz` and writes 0x10 to isa-debug-exit (QEMU exits with status 33).
# Hardware KVM runs it in milliseconds and TCG in ~0.1 s; a KVM that emulates guest code in
# software (nested KVM without usable hardware support, as on some CI sandboxes) needs tens of
# seconds or stops with "KVM internal error ... emulation failure". /dev/kvm existing, and
# libvirt offering kvm domains, proves neither.
_PROBE_CODE = bytes.fromhex(
    "fa2e660f011650000f20c06683c8010f22c066ea1a000f00080066b810008ed88ed0b9809698004975fdb010"
    "e6f4f4ebfd8db426000000000000000000000000ffff0000009acf00ffff00000092cf00170038000f00"
)
_PROBE_EXIT_STATUS = 33
_PROBE_TIMEOUT = 4.0


def _probe_firmware() -> bytes:
    rom = bytearray(65536)
    rom[: len(_PROBE_CODE)] = _PROBE_CODE
    rom[0xFFF0:0xFFF5] = bytes([0xEA, 0x00, 0x00, 0x00, 0xF0])  # reset vector: ljmp f000:0000
    return bytes(rom)


def probe_kvm(emulator: str = "qemu-system-x86_64", timeout: float = _PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot the probe firmware under ``-accel kvm``; (usable, reason)."""
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible"
    with tempfile.TemporaryDirectory(prefix="nimbo-kvm-probe-") as tmp:
        firmware = os.path.join(tmp, "probe.rom")
        with open(firmware, "wb") as f:
            f.write(_probe_firmware())
        cmd = [
            emulator,
            "-machine",
            "pc",
            "-accel",
            "kvm",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "none",
            "-monitor",
            "none",
            "-m",
            "16",
            "-bios",
            firmware,
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
        ]
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return False, (
                f"a 10-million-instruction test guest did not finish within {timeout:.0f} s "
                "under KVM (KVM emulates guest code in software here)"
            )
        except OSError as e:
            return False, f"cannot run {emulator}: {e}"
        elapsed = time.monotonic() - started
    if proc.returncode == _PROBE_EXIT_STATUS:
        return True, f"KVM test guest ran in {elapsed:.2f} s"
    err = " ".join(line for line in proc.stderr.splitlines() if "warning" not in line)[-300:]
    return False, f"KVM test guest failed (exit status {proc.returncode}): {err or 'no output'}"


_detected_lock = threading.Lock()
_detected: dict[str, tuple[str, str]] = {}


# ------------------------------------------------------------------------------------ driver


class LibvirtDriver:
    """HypervisorDriver on libvirt + QEMU (KVM when it really works, TCG otherwise)."""

    def __init__(
        self,
        uri: str = "qemu:///system",
        domain_type: str = "auto",
        host_ip: str = "127.0.0.1",
        console_listen: str = "0.0.0.0",
        owner: str | None = None,
        guest_nice: int = GUEST_NICE,
    ) -> None:
        """``owner`` (the host uuid) is written into every domain this driver starts, and the
        driver then reports only its own domains: two agents on one machine share a libvirtd
        (tests), and a domain that moved to the other host is not reported by both.
        ``guest_nice``: the CPU niceness of the guests' QEMU processes (see ``GUEST_NICE``)."""
        if not 0 <= guest_nice <= 19:
            raise DriverError("INVALID_ARGUMENT", f"Guest niceness {guest_nice} is not between 0 and 19.")
        self.guest_nice = guest_nice
        if domain_type not in ("auto", "kvm", "qemu"):
            raise DriverError("INVALID_ARGUMENT", f"Domain type {domain_type!r} is not auto, kvm or qemu.")
        self.uri = uri
        self.host_ip = host_ip
        self.console_listen = console_listen
        self._domain_type: str | None = None if domain_type == "auto" else domain_type
        self.domain_type_reason = "" if domain_type == "auto" else "forced by configuration"
        self._domcaps: dict[str, ET.Element] = {}
        self._conn: libvirt.virConnect | None = None
        self._conn_lock = threading.RLock()
        self._lifecycle_cb: int | None = None
        self._reboot_cb: int | None = None
        self._ever_connected = False
        self._closed = False
        self._listeners: list[StateListener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[str, str]] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self.owner = owner
        self._raw: asyncio.Queue[tuple[str, str]] | None = None  # events waiting for the owner check
        self._filter: asyncio.Task[None] | None = None
        self._owned: dict[str, bool] = {}  # last known ownership, for domains already gone
        self._background: set[asyncio.Task[Any]] = set()
        self._last_state: dict[str, str] = {}
        self._reboots: dict[str, int] = {}
        self._rebooting: set[str] = set()
        # How long reboot_vm waits for the guest to act on the ACPI button before a hard reset.
        self.reboot_timeout = 60.0

    # ---------------------------------------------------------------- connection handling

    @property
    def is_local(self) -> bool:
        """Local URIs let the driver look at host files (bridges, images, /dev/kvm) directly."""
        return not urlsplit(self.uri).hostname

    def _connection(self) -> libvirt.virConnect:
        with self._conn_lock:
            conn = self._conn
            if conn is not None:
                try:
                    if conn.isAlive():
                        return conn
                except libvirt.libvirtError:
                    pass
                log.warning("libvirt connection to %s lost; reconnecting", self.uri)
                self._drop_connection()
            if self._closed:
                raise DriverError("DRIVER_CLOSED", "The libvirt driver has been closed.")
            _ensure_libvirt_event_loop()
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise DriverError(
                    "LIBVIRT_UNAVAILABLE",
                    f"Cannot connect to libvirt at {self.uri}: is libvirtd running (scripts/start-libvirtd)?",
                    (e.get_error_message() or str(e)).strip(),
                ) from None
            try:
                # Without keepalive a dead libvirtd is only noticed on the next call, and events stop.
                conn.setKeepAlive(5, 3)
            except libvirt.libvirtError:
                pass
            self._conn = conn
            try:
                self._lifecycle_cb = conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                )
                self._reboot_cb = conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._on_reboot, None
                )
                conn.registerCloseCallback(self._on_connection_closed, None)
            except libvirt.libvirtError as e:
                self._drop_connection()
                raise _translate(e, "subscribe to libvirt domain events") from None
            reconnected = self._ever_connected
            self._ever_connected = True
        if reconnected:
            # Events sent while we were disconnected are lost; compare states instead.
            self._call_on_loop(self._schedule_resync)
        return conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for cb in (self._lifecycle_cb, self._reboot_cb):
            if cb is not None:
                try:
                    conn.domainEventDeregisterAny(cb)
                except libvirt.libvirtError:
                    pass
        self._lifecycle_cb = self._reboot_cb = None
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass
        try:
            conn.close()
        except libvirt.libvirtError:
            pass

    def _on_connection_closed(self, _conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        log.warning("libvirt closed the connection to %s (reason %s)", self.uri, reason)
        self._call_on_loop(self._schedule_reconnect)

    def _remember_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._consumer = loop.create_task(self._deliver_events())
            if self.owner:
                self._raw = asyncio.Queue()
                self._filter = loop.create_task(self._filter_events())

    def _call_on_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:  # loop closed between the check and the call
            pass

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _run(self, action: str, fn: Callable[[libvirt.virConnect], T]) -> T:
        """Run ``fn(conn)`` in a worker thread; libvirt errors become DriverErrors."""
        self._remember_loop()

        def work() -> T:
            for attempt in (1, 2):
                conn = self._connection()
                try:
                    return fn(conn)
                except libvirt.libvirtError as e:
                    if attempt == 1 and _is_connection_error(e):
                        # libvirtd restarted under us: one retry on a fresh connection.
                        with self._conn_lock:
                            if self._conn is conn:
                                self._drop_connection()
                        continue
                    raise _translate(e, action) from None
            raise AssertionError("unreachable")

        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(_LIBVIRT_THREADS, ctx.run, work)

    # --------------------------------------------------------------------------- events

    def on_state_change(self, listener: StateListener) -> None:
        self._listeners.append(listener)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # events start with the first driver call made on a loop
        self._remember_loop()
        # Events only flow on an open connection; open it now rather than on the first command.
        self._spawn(self._connect_quietly())

    async def _connect_quietly(self) -> None:
        try:
            await self._run("connect to libvirt", lambda conn: None)
        except DriverError as e:
            log.warning("%s", e)

    def _on_lifecycle(
        self, _conn: libvirt.virConnect, dom: libvirt.virDomain, event: int, detail: int, _opaque: object
    ) -> None:
        # Runs on libvirt's event thread: no blocking, no exceptions escaping into libvirt.
        try:
            vm = vm_uuid_of_domain(dom.name(), dom.UUIDString())
            state = _STATE_OF_EVENT.get(event)
            if vm is None or state is None:
                return
            if event == libvirt.VIR_DOMAIN_EVENT_STARTED and self.guest_nice:
                lower_priority(dom.name(), self.guest_nice)
            if (event, detail) in _MIGRATION_EVENTS:
                return  # the domain left for another host (or pauses to): the management node moves it
            log.debug("domain %s lifecycle event %s/%s -> %s", dom.name(), event, detail, state)
            self._call_on_loop(lambda: self._on_state_event(vm, event, state))
        except Exception:
            log.exception("failed to handle a libvirt lifecycle event")

    def _on_reboot(self, _conn: libvirt.virConnect, dom: libvirt.virDomain, _opaque: object) -> None:
        try:
            vm = vm_uuid_of_domain(dom.name(), dom.UUIDString())
            if vm is not None:
                self._call_on_loop(lambda: self._on_guest_reset(vm))
        except Exception:
            log.exception("failed to handle a libvirt reboot event")

    def _on_guest_reset(self, vm_uuid: str) -> None:
        self._reboots[vm_uuid] = self._reboots.get(vm_uuid, 0) + 1
        # A reboot the guest chose (not ours) is news for the management node: a VM installed
        # from an ISO switches to booting from its disk after that first reboot.
        if vm_uuid not in self._rebooting and self._queue is not None:
            if self._raw is not None:
                self._raw.put_nowait((vm_uuid, REBOOTED))
            else:
                self._queue.put_nowait((vm_uuid, REBOOTED))

    def _on_state_event(self, vm_uuid: str, event: int, state: str) -> None:
        # SHUTDOWN is reported rather than waiting for STOPPED, which comes a second or more later
        # (QEMU is terminated after the guest powered off) - except while reboot_vm is waiting:
        # libvirt's ACPI reboot is a guest power-off that libvirt turns into a reset.
        if event == libvirt.VIR_DOMAIN_EVENT_SHUTDOWN and vm_uuid in self._rebooting:
            return
        if self._raw is not None:
            self._raw.put_nowait((vm_uuid, state))
            return
        self._enqueue(vm_uuid, state)

    async def _filter_events(self) -> None:
        """With an owner: pass on the events of this driver's own domains only, in order."""
        raw = self._raw
        assert raw is not None
        while True:
            vm_uuid, state = await raw.get()
            try:
                owned = await self._owns(vm_uuid)
            except DriverError as e:
                log.warning("cannot tell whether domain of VM %s is ours: %s", vm_uuid, e)
                owned = self._owned.get(vm_uuid, False)
            if not owned:
                continue
            if state == REBOOTED:
                if self._queue is not None:
                    self._queue.put_nowait((vm_uuid, REBOOTED))
            else:
                self._enqueue(vm_uuid, state)

    async def _owns(self, vm_uuid: str) -> bool:
        owner = await self._run("read the domain's owner", lambda conn: _owner_of(conn, domain_name(vm_uuid)))
        if owner is None:  # gone (destroyed, migrated away): as it was
            return self._owned.get(vm_hex(vm_uuid), False)
        owned = self._owned[vm_hex(vm_uuid)] = owner in ("", self.owner)
        return owned

    def _enqueue(self, vm_uuid: str, state: str) -> None:
        # SHUTDOWN is followed by STOPPED, and a fake (ACPI) reboot may report states that
        # did not change: report transitions only.
        if self._last_state.get(vm_uuid) == state:
            return
        self._last_state[vm_uuid] = state
        if self._queue is not None:
            self._queue.put_nowait((vm_uuid, state))

    async def _deliver_events(self) -> None:
        # One consumer keeps the order of transitions for every listener (Stopped before Running).
        queue = self._queue
        assert queue is not None
        while True:
            vm_uuid, state = await queue.get()
            for listener in list(self._listeners):
                try:
                    await listener(vm_uuid, state)
                except Exception:
                    log.exception("state listener failed for VM %s -> %s", vm_uuid, state)

    def _schedule_resync(self) -> None:
        self._spawn(self._resync())

    def _schedule_reconnect(self) -> None:
        self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.5
        while not self._closed:
            try:
                await self._run("reconnect to libvirt", lambda conn: None)
                return
            except DriverError as e:
                log.warning("%s; retrying in %.1f s", e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _resync(self) -> None:
        try:
            states = await self.vm_states()
        except DriverError as e:
            log.warning("cannot resync VM states after reconnecting: %s", e)
            return
        for vm, state in states.items():
            self._enqueue(vm, state)
        for vm in list(self._last_state):
            if vm not in states:
                self._enqueue(vm, STOPPED)

    # ----------------------------------------------------------------------- host facts

    def _resolve_domain_type(self, conn: libvirt.virConnect) -> str:
        if self._domain_type is not None:
            return self._domain_type
        with _detected_lock:
            found = _detected.get(self.uri)
            if found is None:
                found = self._detect_domain_type(conn)
                _detected[self.uri] = found
                log.info("libvirt domain type for %s: %s (%s)", self.uri, *found)
        self._domain_type, self.domain_type_reason = found
        return found[0]

    def _detect_domain_type(self, conn: libvirt.virConnect) -> tuple[str, str]:
        try:
            caps = self._domain_capabilities(conn, "kvm")
        except libvirt.libvirtError as e:
            return "qemu", f"libvirt offers no kvm domains: {(e.get_error_message() or '').strip()}"
        if not self.is_local:
            return "kvm", "remote libvirt offers kvm domains (not test-booted)"
        usable, reason = probe_kvm(caps.findtext("path") or "qemu-system-x86_64")
        return ("kvm" if usable else "qemu"), reason

    def _domain_capabilities(self, conn: libvirt.virConnect, domain_type: str) -> ET.Element:
        caps = self._domcaps.get(domain_type)
        if caps is None:
            caps = ET.fromstring(conn.getDomainCapabilities(None, ARCH, MACHINE, domain_type, 0))
            self._domcaps[domain_type] = caps
        return caps

    async def host_facts(self) -> HostFacts:
        def facts(conn: libvirt.virConnect) -> HostFacts:
            info = conn.getInfo()  # [arch, memory MiB, cpus, MHz, nodes, sockets, cores, threads]
            try:
                total = int(conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)["total"]) * 1024
            except (libvirt.libvirtError, KeyError):
                total = int(info[1]) * 1024 * 1024
            # libvirt names the closest CPU model it knows ("kvm64" in a nested guest); the
            # kernel's model name is what operators recognise.
            model = _local_cpu_model() if self.is_local else ""
            if not model:
                caps = ET.fromstring(conn.getCapabilities())
                vendor = caps.findtext("host/cpu/vendor") or ""
                model = f"{vendor} {caps.findtext('host/cpu/model') or info[0]}".strip()
            return HostFacts(
                cpu_num=int(info[2]),
                cpu_speed_mhz=int(info[3]),
                total_memory=total,
                hypervisor=self._resolve_domain_type(conn),
                cpu_model=model,
                os=_local_os_name() if self.is_local else "",
            )

        return await self._run("read the host facts", facts)

    # ------------------------------------------------------------------------- lifecycle

    def _check_spec(self, conn: libvirt.virConnect, domain_type: str, spec: VmSpec) -> str | None:
        """Refuse what this host cannot do with a clear reason; returns the video model to use."""
        caps = self._domain_capabilities(conn, domain_type)
        graphics = {v.text for v in caps.findall("devices/graphics/enum[@name='type']/value")}
        if spec.console_mode in CONSOLE_MODES and spec.console_mode not in graphics:
            raise DriverError(
                "HOST_CAPABILITY",
                f"This host's QEMU cannot serve a {spec.console_mode} console "
                f"(it supports: {', '.join(sorted(g for g in graphics if g)) or 'none'}).",
            )
        video_model = None
        if spec.console_mode == "spice":
            videos = {v.text for v in caps.findall("devices/video/enum[@name='modelType']/value")}
            # SPICE works with any display adapter; qxl is just the efficient one.
            video_model = "qxl" if "qxl" in videos else "vga"
        if spec.cpu_mode in ("host-model", "host-passthrough"):
            mode = caps.find(f"cpu/mode[@name='{spec.cpu_mode}']")
            if mode is None or mode.get("supported") != "yes":
                why = (
                    " (guests run under QEMU TCG emulation here, which cannot pass the host CPU "
                    "through; use cpu_mode none or host-model)"
                    if domain_type == "qemu" and spec.cpu_mode == "host-passthrough"
                    else ""
                )
                raise DriverError(
                    "HOST_CAPABILITY",
                    f"CPU mode {spec.cpu_mode} is not supported for {domain_type} domains on this host{why}.",
                )
        if self.is_local:
            for disk in spec.disks:
                if not os.path.exists(disk.path):
                    raise DriverError(
                        "VOLUME_NOT_FOUND", f"Disk {disk.volume_uuid} of VM {spec.uuid} is missing: {disk.path}"
                    )
            if spec.iso_path and not os.path.exists(spec.iso_path):
                raise DriverError("ISO_NOT_FOUND", f"ISO {spec.iso_path} of VM {spec.uuid} does not exist.")
            for nic in spec.nics:
                if not os.path.isdir(f"/sys/class/net/{nic.bridge}/bridge"):
                    raise DriverError(
                        "BRIDGE_NOT_FOUND", f"Bridge {nic.bridge!r} of NIC {nic.uuid} does not exist on this host."
                    )
            if spec.console_log:
                os.makedirs(os.path.dirname(os.path.abspath(spec.console_log)), exist_ok=True)
        return video_model

    def _state_of_domain(self, vm: str, state: int) -> str:
        if state == libvirt.VIR_DOMAIN_SHUTDOWN and vm in self._rebooting:
            return RUNNING  # libvirt's ACPI reboot passes through SHUTDOWN and resets the guest
        return _STATE_OF_DOMAIN.get(state, STOPPED)

    async def start_vm(self, spec: VmSpec) -> None:
        name = domain_name(spec.uuid)
        vm = vm_hex(spec.uuid)

        def start(conn: libvirt.virConnect) -> None:
            dom = _lookup(conn, name)
            if dom is not None and dom.isActive():
                state = dom.state()[0]
                if self._state_of_domain(vm, state) == RUNNING:
                    if state == libvirt.VIR_DOMAIN_PAUSED:
                        dom.resume()
                    return
                # Stopped was reported when the guest powered off, but its QEMU is still exiting:
                # a start now must not be taken for "already running" and then vanish.
                _end_powered_off(dom)
            domain_type = self._resolve_domain_type(conn)
            video_model = self._check_spec(conn, domain_type, spec)
            xml = build_domain_xml(spec, domain_type, self.console_listen, video_model, self.owner)
            dom = conn.defineXML(xml)
            dom.create()

        if self.owner:
            self._owned[vm_hex(spec.uuid)] = True
        await self._run(f"start VM {spec.uuid}", start)

    async def stop_vm(self, vm_uuid: str, graceful: bool = True, timeout: float = 60) -> None:
        name = domain_name(vm_uuid)
        action = f"stop VM {vm_uuid}"

        def press_power_button(conn: libvirt.virConnect) -> bool:
            """True while the domain still runs after the request."""
            dom = _need(conn, name)
            if not dom.isActive():
                return False
            if not graceful:
                _force_off(dom)
                return False
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()  # a paused guest cannot see the ACPI button
            try:
                dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
                    return False
                raise
            return True

        def is_active(conn: libvirt.virConnect) -> bool:
            dom = _lookup(conn, name)
            return dom is not None and bool(dom.isActive())

        if not await self._run(action, press_power_button):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        next_press = loop.time() + SHUTDOWN_RESEND_INTERVAL
        while loop.time() < deadline:
            await asyncio.sleep(STOP_POLL_INTERVAL)
            if not await self._run(action, is_active):
                return
            if loop.time() >= next_press:
                next_press = loop.time() + SHUTDOWN_RESEND_INTERVAL
                if not await self._run(action, press_power_button):
                    return
        log.info("VM %s ignored the ACPI shutdown for %.0f s; forcing it off", vm_uuid, timeout)

        def force(conn: libvirt.virConnect) -> None:
            dom = _lookup(conn, name)
            if dom is not None:
                _force_off(dom)

        await self._run(action, force)

    async def reboot_vm(self, vm_uuid: str) -> None:
        """ACPI reboot so the guest can flush its disks; hard reset if it ignores the button."""
        name = domain_name(vm_uuid)
        vm = vm_hex(vm_uuid)
        action = f"reboot VM {vm_uuid}"
        self._remember_loop()
        before = self._reboots.get(vm, 0)

        def reboot(conn: libvirt.virConnect) -> None:
            dom = _need(conn, name)
            if not dom.isActive():
                raise DriverError("VM_NOT_RUNNING", f"Cannot reboot VM {vm_uuid}: it is not running.")
            # libvirt powers the guest off through ACPI and starts it again in the same QEMU.
            dom.reboot(libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)

        self._rebooting.add(vm)
        try:
            await self._run(action, reboot)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.reboot_timeout
            while loop.time() < deadline:
                if self._reboots.get(vm, 0) > before:
                    return
                await asyncio.sleep(0.1)
        finally:
            self._rebooting.discard(vm)
        log.info("VM %s ignored the ACPI reboot for %.0f s; resetting it", vm_uuid, self.reboot_timeout)

        def reset(conn: libvirt.virConnect) -> None:
            dom = _need(conn, name)
            if dom.isActive():
                dom.reset(0)

        await self._run(action, reset)

    async def pause_vm(self, vm_uuid: str) -> None:
        name = domain_name(vm_uuid)

        def pause(conn: libvirt.virConnect) -> None:
            dom = _need(conn, name)
            state = dom.state()[0]
            if state == libvirt.VIR_DOMAIN_PAUSED:
                return
            if not dom.isActive():
                raise DriverError("VM_NOT_RUNNING", f"Cannot pause VM {vm_uuid}: it is not running.")
            dom.suspend()

        await self._run(f"pause VM {vm_uuid}", pause)

    async def resume_vm(self, vm_uuid: str) -> None:
        name = domain_name(vm_uuid)

        def resume(conn: libvirt.virConnect) -> None:
            dom = _need(conn, name)
            if not dom.isActive():
                raise DriverError("VM_NOT_RUNNING", f"Cannot resume VM {vm_uuid}: it is not running.")
            if dom.state()[0] in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED):
                dom.resume()

        await self._run(f"resume VM {vm_uuid}", resume)

    async def destroy_vm(self, vm_uuid: str) -> None:
        name = domain_name(vm_uuid)

        def destroy(conn: libvirt.virConnect) -> None:
            dom = _lookup(conn, name)
            if dom is None:
                return
            if self.owner and _domain_owner(dom) not in ("", self.owner):
                return  # started for another host since (it shares this libvirtd): not ours to destroy
            _force_off(dom)
            flags = (
                libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            )
            try:
                dom.undefineFlags(flags)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return
                if e.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
                    raise
                dom.undefine()  # older libvirt without some of the flags

        await self._run(f"destroy VM {vm_uuid}", destroy)
        self._last_state.pop(vm_hex(vm_uuid), None)

    async def vm_states(self) -> dict[str, str]:
        def states(conn: libvirt.virConnect) -> dict[str, str]:
            result: dict[str, str] = {}
            for dom in conn.listAllDomains(0):
                vm = vm_uuid_of_domain(dom.name(), dom.UUIDString())
                if vm is None:
                    continue
                try:
                    if self.owner:
                        owned = self._owned[vm] = _domain_owner(dom) in ("", self.owner)
                        if not owned:
                            continue
                    state = dom.state()[0]
                except libvirt.libvirtError as e:
                    if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        continue  # undefined while we were listing
                    raise
                result[vm] = self._state_of_domain(vm, state)
            return result

        return await self._run("list the VM states", states)

    # --------------------------------------------------------------------------- devices

    async def attach_disk(self, vm_uuid: str, disk: DiskSpec) -> None:
        name = domain_name(vm_uuid)
        element = disk_element(disk)
        target = disk_target(disk.device_id)

        def attach(conn: libvirt.virConnect) -> None:
            if self.is_local and not os.path.exists(disk.path):
                raise DriverError("VOLUME_NOT_FOUND", f"Disk {disk.volume_uuid} is missing: {disk.path}")
            dom = _need(conn, name)
            flags = 0
            views = [(libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt.VIR_DOMAIN_XML_INACTIVE)]
            if dom.isActive():
                views.append((libvirt.VIR_DOMAIN_AFFECT_LIVE, 0))
            for flag, xml_flags in views:
                existing = _find_disk(ET.fromstring(dom.XMLDesc(xml_flags)), disk.path, target)
                if existing is None:
                    flags |= flag
                    continue
                source = existing.find("source")
                if source is None or source.get("file") != disk.path:
                    raise DriverError(
                        "DEVICE_BUSY",
                        f"VM {vm_uuid} already has another disk at {target}.",
                        source.get("file", "") if source is not None else "",
                    )
            if flags:
                dom.attachDeviceFlags(ET.tostring(element, encoding="unicode"), flags)

        await self._run(f"attach disk {disk.volume_uuid} to VM {vm_uuid}", attach)

    async def detach_disk(self, vm_uuid: str, disk: DiskSpec) -> None:
        name = domain_name(vm_uuid)
        target = disk_target(disk.device_id)

        def detach(conn: libvirt.virConnect) -> bool:
            """Start the detach; True if the guest must still release the disk."""
            dom = _need(conn, name)
            active = bool(dom.isActive())
            views = [(libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt.VIR_DOMAIN_XML_INACTIVE)]
            if active:
                views.append((libvirt.VIR_DOMAIN_AFFECT_LIVE, 0))
            live = False
            for flag, xml_flags in views:
                existing = _find_disk(ET.fromstring(dom.XMLDesc(xml_flags)), disk.path, target)
                if existing is None:
                    continue
                dom.detachDeviceFlags(ET.tostring(existing, encoding="unicode"), flag)
                live = live or flag == libvirt.VIR_DOMAIN_AFFECT_LIVE
            return live

        def still_attached(conn: libvirt.virConnect) -> bool:
            dom = _need(conn, name)
            if not dom.isActive():
                return False
            return _find_disk(ET.fromstring(dom.XMLDesc(0)), disk.path, target) is not None

        action = f"detach disk {disk.volume_uuid} from VM {vm_uuid}"
        if not await self._run(action, detach):
            return
        # Hot-unplug needs the guest's cooperation (ACPI PCI hotplug); libvirt returns early.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DETACH_TIMEOUT
        while await self._run(action, still_attached):
            if loop.time() >= deadline:
                raise DriverError(
                    "DETACH_TIMEOUT",
                    f"VM {vm_uuid} did not release disk {target} within "
                    f"{DETACH_TIMEOUT:.0f} s; it is removed from the configuration "
                    "and goes away at the next power-off.",
                    disk.path,
                )
            await asyncio.sleep(0.2)

    async def attach_iso(self, vm_uuid: str, iso_path: str) -> None:
        await self._change_media(vm_uuid, iso_path, f"attach ISO {iso_path} to VM {vm_uuid}")

    async def detach_iso(self, vm_uuid: str) -> None:
        await self._change_media(vm_uuid, None, f"detach the ISO from VM {vm_uuid}")

    async def _change_media(self, vm_uuid: str, iso_path: str | None, action: str) -> None:
        name = domain_name(vm_uuid)

        def change(conn: libvirt.virConnect) -> None:
            if iso_path is not None and self.is_local and not os.path.exists(iso_path):
                raise DriverError("ISO_NOT_FOUND", f"ISO {iso_path} does not exist.")
            dom = _need(conn, name)
            active = bool(dom.isActive())
            current = ET.fromstring(dom.XMLDesc(0 if active else libvirt.VIR_DOMAIN_XML_INACTIVE))
            cdrom = current.find("devices/disk[@device='cdrom']")
            if cdrom is None:
                if active:
                    raise DriverError(
                        "HOST_CAPABILITY",
                        f"VM {vm_uuid} has no cdrom drive and one cannot be hot-plugged; stop the VM first.",
                    )
                if iso_path is not None:
                    dom.attachDeviceFlags(
                        ET.tostring(cdrom_element(iso_path), encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_CONFIG
                    )
                return
            tgt = cdrom.find("target")
            target = tgt.get("dev", CDROM_TARGET) if tgt is not None else CDROM_TARGET
            bus = tgt.get("bus", CDROM_BUS) if tgt is not None else CDROM_BUS
            xml = ET.tostring(cdrom_element(iso_path, target, bus), encoding="unicode")
            flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
            if active:
                # FORCE ejects even when the guest locked the tray (a mounted ISO).
                flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_DEVICE_MODIFY_FORCE
            for attempt in range(MEDIA_CHANGE_ATTEMPTS):
                try:
                    dom.updateDeviceFlags(xml, flags)
                    return
                except libvirt.libvirtError as e:
                    # A forced eject does not wait for the tray: a guest probing the drive can
                    # close it again before libvirt removes the medium. Trying again wins.
                    if "tray" not in (e.get_error_message() or "").lower() or attempt == MEDIA_CHANGE_ATTEMPTS - 1:
                        raise
                    time.sleep(min(0.2 * (attempt + 1), 1.0))  # a busy (TCG) guest needs longer

        await self._run(action, change)

    async def snapshot_disk(self, vm_uuid: str, disk: DiskSpec, new_path: str) -> None:
        """An external disk-only snapshot of one disk of the running domain: QEMU creates
        ``new_path`` (qcow2, backed by the current file) and writes there from now on."""
        name = domain_name(vm_uuid)
        target = disk_target(disk.device_id)

        def snapshot(conn: libvirt.virConnect) -> None:
            dom = _need(conn, name)
            if not dom.isActive():
                raise DriverError("VM_NOT_RUNNING", f"VM {vm_uuid} is not running; snapshot its file instead.")
            current = ET.fromstring(dom.XMLDesc(0))
            found = _find_disk(current, disk.path, target)
            if found is None:
                raise DriverError("VOLUME_NOT_FOUND", f"VM {vm_uuid} has no disk {disk.path}")
            found_target = found.find("target")
            dev = found_target.get("dev") if found_target is not None else target
            snap = ET.Element("domainsnapshot")
            _sub(snap, "name", f"nimbo-{uuidlib.uuid4().hex}")
            disks = _sub(snap, "disks")
            for d in current.findall("devices/disk"):
                t = d.find("target")
                if t is None or not t.get("dev"):
                    continue
                if t.get("dev") == dev:
                    el = _sub(disks, "disk", name=dev, snapshot="external", type="file")
                    _sub(el, "driver", type="qcow2")
                    _sub(el, "source", file=new_path)
                else:
                    _sub(disks, "disk", name=t.get("dev", ""), snapshot="no")
            flags = (
                libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
            )
            dom.snapshotCreateXML(ET.tostring(snap, encoding="unicode"), flags)

        await self._run(f"snapshot disk {disk.volume_uuid} of VM {vm_uuid}", snapshot)

    async def migrate_vm(
        self, vm_uuid: str, dest_uri: str, dest_host_uuid: str, dest: object | None, console_log: str | None = None
    ) -> None:
        """Live migration, peer to peer, to the libvirtd at ``dest_uri`` (the disks are on shared
        storage, so no storage is copied). The destination defines the domain as its own."""
        name = domain_name(vm_uuid)

        def migrate(conn: libvirt.virConnect) -> None:
            dom = _need(conn, name)
            if not dom.isActive():
                raise DriverError("VM_NOT_RUNNING", f"VM {vm_uuid} is not running; only a running VM migrates live.")
            xml = set_domain_owner(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE), dest_host_uuid)
            if console_log:
                xml = set_console_log(xml, console_log)
            params = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: xml, libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: xml}
            # the stream goes to the address the management node knows the destination by; left to
            # itself the destination offers its hostname, which need not resolve from here
            if dest_ip := urlsplit(dest_uri).hostname:
                params[libvirt.VIR_MIGRATE_PARAM_URI] = f"tcp://{dest_ip}"
            flags = (
                libvirt.VIR_MIGRATE_LIVE
                | libvirt.VIR_MIGRATE_PEER2PEER
                | libvirt.VIR_MIGRATE_PERSIST_DEST
                | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
                | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
                # libvirt calls a disk with host caching safe to migrate only on a filesystem it
                # knows to be shared (NFS, GlusterFS, ...); a SharedMountPoint is shared because the
                # operator says so (any cluster filesystem, mounted on every host), and QEMU flushes
                # the disks before the destination resumes
                | libvirt.VIR_MIGRATE_UNSAFE
            )
            dom.migrateToURI3(dest_uri, params, flags)

        await self._run(f"migrate VM {vm_uuid} to {dest_uri}", migrate)
        self._owned[vm_hex(vm_uuid)] = False
        self._last_state.pop(vm_hex(vm_uuid), None)

    async def console_address(self, vm_uuid: str) -> ConsoleAddress:
        name = domain_name(vm_uuid)

        def address(conn: libvirt.virConnect) -> ConsoleAddress:
            dom = _need(conn, name)
            if not dom.isActive():
                raise DriverError("VM_NOT_RUNNING", f"VM {vm_uuid} has no console: it is not running.")
            graphics = ET.fromstring(dom.XMLDesc(0)).find("devices/graphics")
            if graphics is None:
                raise DriverError("NO_CONSOLE", f"VM {vm_uuid} has no graphical console.")
            port = int(graphics.get("port", "-1"))
            if port <= 0:
                raise DriverError("NO_CONSOLE", f"The console of VM {vm_uuid} has no port yet.")
            return ConsoleAddress(self.host_ip, port, graphics.get("type", "vnc"))

        return await self._run(f"find the console of VM {vm_uuid}", address)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._background):
            task.cancel()
        if self._consumer is not None:
            self._consumer.cancel()
            self._consumer = None
        if self._filter is not None:
            self._filter.cancel()
            self._filter = None
        self._loop = None

        def shut() -> None:
            with self._conn_lock:
                self._drop_connection()

        await asyncio.to_thread(shut)


# ------------------------------------------------------------------------------ small helpers


def _lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def _end_powered_off(dom: libvirt.virDomain, wait: float = 10.0) -> None:
    """Wait for libvirt to end the QEMU of a guest that powered off; kill it if libvirt lingers."""
    deadline = time.monotonic() + wait
    while dom.isActive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if dom.isActive():
        try:
            dom.destroy()  # the guest is already off: nothing is lost
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                raise


def _need(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    dom = _lookup(conn, name)
    if dom is None:
        vm = name[len(DOMAIN_PREFIX) :]
        raise DriverError("VM_NOT_FOUND", f"VM {vm} has no domain on this host.", name)
    return dom


def _domain_owner(dom: libvirt.virDomain) -> str:
    """The host recorded in the domain's metadata; "" when none is (a domain of an older agent)."""
    try:
        xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return ""
        raise
    for el in ET.fromstring(xml).iter():
        if el.tag == "host" or el.tag.endswith("}host"):
            return (el.text or "").strip()
    return ""


def _owner_of(conn: libvirt.virConnect, name: str) -> str | None:
    """The domain's owner, or None when there is no such domain."""
    dom = _lookup(conn, name)
    if dom is None:
        return None
    try:
        return _domain_owner(dom)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def set_domain_owner(xml: str, owner: str) -> str:
    """The domain XML with ``owner`` as the host in nimbostack's metadata (for a migration)."""
    dom = ET.fromstring(xml)
    instance = dom.find(f"metadata/{{{METADATA_NS}}}instance")
    if instance is None:
        metadata = dom.find("metadata")
        if metadata is None:
            metadata = _sub(dom, "metadata")
        instance = _sub(metadata, f"{{{METADATA_NS}}}instance")
    host = instance.find(f"{{{METADATA_NS}}}host")
    if host is None:
        host = _sub(instance, f"{{{METADATA_NS}}}host")
    host.text = owner
    return ET.tostring(dom, encoding="unicode")


def lower_priority(domain: str, nice: int, pid_dir: str = QEMU_PID_DIR) -> int:
    """Set the niceness of every thread of the domain's QEMU (niceness is per thread on Linux;
    threads QEMU makes later inherit it). Returns how many threads; 0 if QEMU is not found."""
    try:
        pid = int(Path(pid_dir, f"{domain}.pid").read_text().strip())
        threads = os.listdir(f"/proc/{pid}/task")
    except (OSError, ValueError) as e:
        log.debug("cannot find the QEMU of %s to lower its priority: %s", domain, e)
        return 0
    done = 0
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
            done += 1
        except OSError as e:  # a thread that just ended
            log.debug("cannot renice thread %s of %s: %s", tid, domain, e)
    return done


def set_console_log(xml: str, path: str) -> str:
    """The domain XML logging its serial console to ``path``, appended to: the destination of a
    migration keeps its own log of the guest, and a guest coming back adds to the old one."""
    dom = ET.fromstring(xml)
    for log_el in dom.findall("devices/serial/log"):
        log_el.set("file", path)
        log_el.set("append", "on")
    return ET.tostring(dom, encoding="unicode")


def _force_off(dom: libvirt.virDomain) -> None:
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError as e:
        # It may have stopped (or vanished) between the check and the destroy.
        if e.get_error_code() not in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
            raise


def _find_disk(domain: ET.Element, path: str, target: str) -> ET.Element | None:
    """The disk with this source file, else the one at this target."""
    disks = domain.findall("devices/disk[@device='disk']")
    for d in disks:
        source = d.find("source")
        if source is not None and source.get("file") == path:
            return d
    for d in disks:
        tgt = d.find("target")
        if tgt is not None and tgt.get("dev") == target:
            return d
    return None


def _local_os_name() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return ""


def _local_cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
