"""The libvirtd connection (opened, kept, its event thread), libvirt errors as DriverErrors, and the KVM probe."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import libvirt

from nimbostack.agent.driver import DriverError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Threads for blocking libvirt calls, apart from asyncio's default pool (CPUs + 4 threads), which
# image copies and fsyncs hold for minutes: a VM start or a state query must not queue behind
# them. libvirtd serves 20 calls at a time by default.
_LIBVIRT_THREADS = ThreadPoolExecutor(max_workers=20, thread_name_prefix="libvirt")

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

# Without libvirt's default event loop there are no domain events and no keepalive: it runs in
# one daemon thread per process, and the callbacks hand events to asyncio with call_soon_threadsafe.
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


# ---------------------------------------------------------------------------- the connection


class LibvirtConnection:
    """The connection to one libvirtd: opened on first use and again whenever it was lost, with the
    domain event callbacks subscribed on each connection it opens."""

    def __init__(
        self,
        uri: str,
        on_lifecycle: Callable[[libvirt.virConnect, libvirt.virDomain, int, int, object], None],
        on_reboot: Callable[[libvirt.virConnect, libvirt.virDomain, object], None],
        on_lost: Callable[[], None],
        on_reconnected: Callable[[], None],
    ) -> None:
        """``on_lifecycle``, ``on_reboot`` and ``on_lost`` (libvirtd closed the connection) run on
        libvirt's event thread; ``on_reconnected`` in the worker thread that opened a connection
        again after one was lost."""
        self.uri = uri
        self.closed = False
        self._on_lifecycle = on_lifecycle
        self._on_reboot = on_reboot
        self._on_lost = on_lost
        self._on_reconnected = on_reconnected
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.RLock()
        self._lifecycle_cb: int | None = None
        self._reboot_cb: int | None = None
        self._ever_connected = False

    async def run(self, action: str, fn: Callable[[libvirt.virConnect], T]) -> T:
        """Run ``fn(conn)`` in a worker thread; libvirt errors become DriverErrors."""
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(_LIBVIRT_THREADS, ctx.run, self._call, action, fn)

    def drop(self) -> None:
        """Close the connection, if one is open (blocking)."""
        with self._lock:
            self._drop()

    def _call(self, action: str, fn: Callable[[libvirt.virConnect], T]) -> T:
        for attempt in (1, 2):
            conn = self._connected()
            try:
                return fn(conn)
            except libvirt.libvirtError as e:
                if attempt == 1 and _is_connection_error(e):
                    # libvirtd restarted under us: one retry on a fresh connection.
                    with self._lock:
                        if self._conn is conn:
                            self._drop()
                    continue
                raise _translate(e, action) from None
        raise AssertionError("unreachable")

    def _connected(self) -> libvirt.virConnect:
        """The open connection; one is opened when there is none or it died (blocking)."""
        with self._lock:
            conn = self._conn
            if conn is not None:
                try:
                    if conn.isAlive():
                        return conn
                except libvirt.libvirtError:
                    pass
                log.warning("libvirt connection to %s lost; reconnecting", self.uri)
                self._drop()
            if self.closed:
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
                conn.registerCloseCallback(self._closed_by_libvirtd, None)
            except libvirt.libvirtError as e:
                self._drop()
                raise _translate(e, "subscribe to libvirt domain events") from None
            reconnected = self._ever_connected
            self._ever_connected = True
        if reconnected:
            self._on_reconnected()
        return conn

    def _drop(self) -> None:
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

    def _closed_by_libvirtd(self, _conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        log.warning("libvirt closed the connection to %s (reason %s)", self.uri, reason)
        self._on_lost()


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
