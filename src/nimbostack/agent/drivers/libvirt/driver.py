"""LibvirtDriver: the host agent's HypervisorDriver on libvirt and QEMU."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import libvirt

from nimbostack.agent.driver import DriverError, StateListener
from nimbostack.agent.drivers.libvirt.connection import LibvirtConnection, probe_kvm
from nimbostack.agent.drivers.libvirt.domain_xml import (
    ARCH,
    CDROM_BUS,
    CDROM_TARGET,
    CONSOLE_MODES,
    DOMAIN_PREFIX,
    MACHINE,
    METADATA_NS,
    VNC_LISTEN,
    build_domain_xml,
    cdrom_element,
    disk_element,
    disk_snapshot_xml,
    disk_target,
    domain_name,
    find_disk,
    find_interface,
    interface_xml,
    set_console_log,
    set_domain_owner,
    vm_hex,
    vm_uuid_of_domain,
)
from nimbostack.wire import (
    PAUSED,
    REBOOTED,
    RUNNING,
    STOPPED,
    ConsoleAddress,
    DiskSpec,
    HostFacts,
    NicSpec,
    VmSpec,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MEDIA_CHANGE_ATTEMPTS = 12
# How long detach_disk waits for the guest to release a hot-unplugged disk.
DETACH_TIMEOUT = 20.0
# Guests that were still booting when the ACPI button was pressed never saw it; press again.
SHUTDOWN_RESEND_INTERVAL = 5.0
STOP_POLL_INTERVAL = 0.2

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

# A live migration's source pauses and stops the domain: not a state change of the VM.
_MIGRATION_EVENTS = {
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED),
    (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED),
}

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
        self._connection = LibvirtConnection(
            uri,
            self._on_lifecycle,
            self._on_reboot,
            on_lost=lambda: self._call_on_loop(self._schedule_reconnect),
            # Events sent while we were disconnected are lost; compare states instead.
            on_reconnected=lambda: self._call_on_loop(self._schedule_resync),
        )
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
        return await self._connection.run(action, fn)

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
        while not self._connection.closed:
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
            for flag, xml_flags in _views(dom):
                existing = find_disk(ET.fromstring(dom.XMLDesc(xml_flags)), disk.path, target)
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
            live = False
            for flag, xml_flags in _views(dom):
                existing = find_disk(ET.fromstring(dom.XMLDesc(xml_flags)), disk.path, target)
                if existing is None:
                    continue
                dom.detachDeviceFlags(ET.tostring(existing, encoding="unicode"), flag)
                live = live or flag == libvirt.VIR_DOMAIN_AFFECT_LIVE
            return live

        def still_attached(conn: libvirt.virConnect) -> bool:
            dom = _need(conn, name)
            if not dom.isActive():
                return False
            return find_disk(ET.fromstring(dom.XMLDesc(0)), disk.path, target) is not None

        action = f"detach disk {disk.volume_uuid} from VM {vm_uuid}"
        if await self._run(action, detach):
            await self._wait_released(action, still_attached, f"VM {vm_uuid} did not release disk {target}", disk.path)

    async def _wait_released(
        self, action: str, still_attached: Callable[[libvirt.virConnect], bool], what: str, details: str
    ) -> None:
        # Hot-unplug needs the guest's cooperation (ACPI PCI hotplug); libvirt returns early.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DETACH_TIMEOUT
        while await self._run(action, still_attached):
            if loop.time() >= deadline:
                raise DriverError(
                    "DETACH_TIMEOUT",
                    f"{what} within {DETACH_TIMEOUT:.0f} s; it is removed from the configuration "
                    "and goes away at the next power-off.",
                    details,
                )
            await asyncio.sleep(0.2)

    async def attach_nic(self, vm_uuid: str, nic: NicSpec) -> None:
        """Hot-plug a virtio NIC: into the live guest when it runs and into the persistent
        definition, each only where a NIC with that MAC is not there yet (a retry is a no-op)."""
        name = domain_name(vm_uuid)
        xml = interface_xml(nic)

        def attach(conn: libvirt.virConnect) -> None:
            dom = _need(conn, name)
            flags = 0
            for flag, xml_flags in _views(dom):
                if find_interface(ET.fromstring(dom.XMLDesc(xml_flags)), nic.mac) is None:
                    flags |= flag
            if flags:
                dom.attachDeviceFlags(xml, flags)

        await self._run(f"attach NIC {nic.mac} to VM {vm_uuid}", attach)

    async def detach_nic(self, vm_uuid: str, nic: NicSpec) -> None:
        """Unplug the NIC with ``nic.mac`` from the persistent definition and the live guest; no
        error when it is not there. Waits for the guest to let the live one go."""
        name = domain_name(vm_uuid)

        def detach(conn: libvirt.virConnect) -> bool:
            dom = _need(conn, name)
            live = False
            for flag, xml_flags in _views(dom):
                existing = find_interface(ET.fromstring(dom.XMLDesc(xml_flags)), nic.mac)
                if existing is not None:
                    dom.detachDeviceFlags(ET.tostring(existing, encoding="unicode"), flag)
                    live = live or flag == libvirt.VIR_DOMAIN_AFFECT_LIVE
            return live

        def still_attached(conn: libvirt.virConnect) -> bool:
            dom = _need(conn, name)
            return bool(dom.isActive()) and find_interface(ET.fromstring(dom.XMLDesc(0)), nic.mac) is not None

        action = f"detach NIC {nic.mac} from VM {vm_uuid}"
        if await self._run(action, detach):
            await self._wait_released(action, still_attached, f"VM {vm_uuid} did not release NIC {nic.mac}", nic.mac)

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
            found = find_disk(current, disk.path, target)
            if found is None:
                raise DriverError("VOLUME_NOT_FOUND", f"VM {vm_uuid} has no disk {disk.path}")
            found_target = found.find("target")
            dev = found_target.get("dev") if found_target is not None else target
            flags = (
                libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
            )
            dom.snapshotCreateXML(disk_snapshot_xml(current, dev, new_path), flags)

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
            # a console bound to one address (VNC: the loopback) is reachable there and nowhere else
            listen = graphics.get("listen", "")
            reachable = listen if listen and listen not in ("0.0.0.0", "::") else self.host_ip
            return ConsoleAddress(reachable, port, graphics.get("type", "vnc"))

        return await self._run(f"find the console of VM {vm_uuid}", address)

    async def open_vnc(self, vm_uuid: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        addr = await self.console_address(vm_uuid)
        if addr.protocol != "vnc":
            raise DriverError(
                "CONSOLE_NOT_VNC",
                f"VM {vm_uuid} has a {addr.protocol} console; the browser console needs kvm vm.consoleMode=vnc.",
            )
        if not self.is_local:
            raise DriverError(
                "NO_CONSOLE", f"VM {vm_uuid} runs on a remote libvirt; its VNC is on that machine's loopback."
            )
        try:
            return await asyncio.open_connection(VNC_LISTEN, addr.port)
        except OSError as err:
            raise DriverError("NO_CONSOLE", f"The VNC server of VM {vm_uuid} does not answer.", str(err)) from None

    async def close(self) -> None:
        self._connection.closed = True
        for task in list(self._background):
            task.cancel()
        if self._consumer is not None:
            self._consumer.cancel()
            self._consumer = None
        if self._filter is not None:
            self._filter.cancel()
            self._filter = None
        self._loop = None

        await asyncio.to_thread(self._connection.drop)


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


def _views(dom: libvirt.virDomain) -> list[tuple[int, int]]:
    """(device flag, XMLDesc flags) of each definition a device change must reach: the
    persistent one always, the live one when the domain runs."""
    views = [(libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt.VIR_DOMAIN_XML_INACTIVE)]
    if dom.isActive():
        views.append((libvirt.VIR_DOMAIN_AFFECT_LIVE, 0))
    return views


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


def _force_off(dom: libvirt.virDomain) -> None:
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError as e:
        # It may have stopped (or vanished) between the check and the destroy.
        if e.get_error_code() not in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
            raise


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
