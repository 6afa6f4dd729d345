"""The libvirt driver against a real libvirtd and real QEMU guests (no mocks).

Needs root, libvirtd (``scripts/start-libvirtd``) and the packages of
``scripts/libvirt-packages.txt``. The guest is the tiny image of ``images/build-tiny`` (the
``tiny_image_dir`` fixture of image_fixtures.py: built into build/tiny-image, or taken from
``$NIMBO_IMAGE_DIR``); if it cannot be built the lifecycle tests still run on an empty disk
(SeaBIOS only) and the tests that need a guest OS are skipped.
``$NIMBO_DOMAIN_TYPE`` (auto|kvm|qemu) overrides KVM detection, ``$NIMBO_LIBVIRT_URI`` the URI.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed: .ci/run installs it")

from nimbostack.agent.driver import DriverError  # noqa: E402
from nimbostack.agent.drivers.libvirt.connection import probe_kvm  # noqa: E402
from nimbostack.agent.drivers.libvirt.domain_xml import METADATA_NS, domain_name  # noqa: E402
from nimbostack.agent.drivers.libvirt.driver import LibvirtDriver  # noqa: E402
from nimbostack.wire import PAUSED, REBOOTED, RUNNING, STOPPED, DiskSpec, NicSpec, VmSpec  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from image_fixtures import tiny_image_dir  # noqa: E402, F401  (pytest fixture, used by guest_image)

URI = os.environ.get("NIMBO_LIBVIRT_URI", "qemu:///system")
BOOT_TIMEOUT = 120.0  # TCG boots the tiny guest in ~10 s on 2 cores; leave room for a busy CI
EVENT_TIMEOUT = 2.0


def _libvirtd_reachable() -> bool:
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError:
        return False
    conn.close()
    return True


if os.geteuid() != 0 or shutil.which("qemu-img") is None or not _libvirtd_reachable():
    pytest.skip("libvirtd not running: run scripts/start-libvirtd", allow_module_level=True)


# ----------------------------------------------------------------------------------- images


@dataclass
class GuestImage:
    disk: Path
    iso: Path | None
    tiny: bool  # a real guest OS that prints NIMBO- lines and handles ACPI


@pytest.fixture(scope="session")
def guest_image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> GuestImage:
    try:
        out = request.getfixturevalue("tiny_image_dir")
    except (pytest.skip.Exception, pytest.fail.Exception) as e:
        # Lifecycle, events, consoles and devices still work on a guest with nothing to boot.
        print(f"tiny guest image unavailable, using an empty disk: {e}")
        empty = tmp_path_factory.mktemp("empty") / "empty.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(empty), "64M"], check=True)
        return GuestImage(empty, None, False)
    iso = out / "tiny.iso"
    return GuestImage(out / "tiny.qcow2", iso if iso.exists() else None, True)


def needs_guest_os(image: GuestImage) -> None:
    if not image.tiny:
        pytest.skip("needs the tiny guest of images/build-tiny (it could not be built)")


def overlay(base: Path, path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(path)], check=True)
    return path


def blank_qcow2(path: Path, size: str = "64M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def virsh(*args: str) -> str:
    proc = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"virsh {' '.join(args)}: {proc.stderr}"
    return proc.stdout


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture
def bridge() -> Iterator[str]:
    name = f"nbt-{secrets.token_hex(3)}"
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


class Recorder:
    """A state listener that remembers every (vm, state) with its arrival time."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, str]] = []
        self._changed = asyncio.Event()

    async def __call__(self, vm_uuid: str, state: str) -> None:
        self.events.append((time.monotonic(), vm_uuid, state))
        self._changed.set()

    def states(self, vm_uuid: str) -> list[str]:
        """The states reported; REBOOTED is a notice that the guest reset, not a state."""
        return [s for _, v, s in self.events if v == vm_uuid and s != REBOOTED]

    def notices(self, vm_uuid: str) -> list[str]:
        return [s for _, v, s in self.events if v == vm_uuid and s == REBOOTED]

    async def wait_for(self, vm_uuid: str, state: str, since: float, timeout: float) -> float:
        """Seconds from ``since`` until ``state`` was reported for ``vm_uuid`` after ``since``."""
        deadline = time.monotonic() + timeout
        while True:
            for t, v, s in self.events:
                if v == vm_uuid and s == state and t >= since:
                    return t - since
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {state} event for {vm_uuid} within {timeout} s; got {self.events}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass


@dataclass
class Harness:
    driver: LibvirtDriver
    events: Recorder
    image: GuestImage
    bridge: str
    tmp: Path
    vms: list[str] = field(default_factory=list)
    latencies: dict[str, float] = field(default_factory=dict)

    def spec(self, name: str = "vm", *, disk_base: Path | None = None, **kw: object) -> VmSpec:
        vm = uuid.uuid4().hex
        root = overlay(disk_base or self.image.disk, self.tmp / f"{vm}-root.qcow2")
        spec = VmSpec(
            uuid=vm,
            name=name,
            cpu_num=1,
            memory=192 << 20,
            disks=[DiskSpec(volume_uuid=uuid.uuid4().hex, path=str(root), device_id=0)],
            nics=[NicSpec(uuid=uuid.uuid4().hex, mac=random_mac(), bridge=self.bridge, device_id=0)],
            console_log=str(self.tmp / f"{vm}-console.log"),
        )
        for key, value in kw.items():
            setattr(spec, key, value)
        self.vms.append(vm)
        return spec

    async def start(self, spec: VmSpec) -> float:
        since = time.monotonic()
        await self.driver.start_vm(spec)
        return await self.events.wait_for(spec.uuid, RUNNING, since, EVENT_TIMEOUT)

    async def boot(self, spec: VmSpec) -> None:
        """Start and, for the tiny guest, wait until it says it is ready."""
        await self.start(spec)
        if self.image.tiny:
            await wait_console(spec, "NIMBO-READY", BOOT_TIMEOUT)

    def dom(self, vm_uuid: str) -> libvirt.virDomain:
        conn = libvirt.open(URI)
        try:
            return conn.lookupByName(domain_name(vm_uuid))
        finally:
            conn.close()

    def xml(self, vm_uuid: str, inactive: bool = False) -> ET.Element:
        args = ["dumpxml", domain_name(vm_uuid)] + (["--inactive"] if inactive else [])
        return ET.fromstring(virsh(*args))


@pytest.fixture
async def harness(guest_image: GuestImage, bridge: str, tmp_path: Path) -> AsyncIterator[Harness]:
    driver = LibvirtDriver(URI, domain_type=os.environ.get("NIMBO_DOMAIN_TYPE", "auto"))
    recorder = Recorder()
    driver.on_state_change(recorder)
    h = Harness(driver, recorder, guest_image, bridge, tmp_path)
    try:
        yield h
    finally:
        for vm in h.vms:
            try:
                await driver.destroy_vm(vm)
            except DriverError as e:
                print(f"cleanup of {vm}: {e}")
        await driver.close()
        for name, value in h.latencies.items():
            print(f"latency {name}: {value * 1000:.0f} ms")


def random_mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def console(spec: VmSpec) -> str:
    assert spec.console_log
    try:
        return Path(spec.console_log).read_text(errors="replace")
    except FileNotFoundError:
        return ""


async def wait_console(spec: VmSpec, text: str, timeout: float, count: int = 1) -> None:
    deadline = time.monotonic() + timeout
    while console(spec).count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} x{count} not on the console within {timeout} s:\n{console(spec)[-3000:]}")
        await asyncio.sleep(0.2)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.2)


def type_on_console(vm_uuid: str, *lines: str) -> None:
    """Type commands into the guest's serial console through libvirt's console stream."""
    conn = libvirt.open(URI)
    try:
        stream = conn.newStream(0)
        conn.lookupByName(domain_name(vm_uuid)).openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        # QEMU only reads a pty it has seen connected (it polls about once a second).
        time.sleep(1.0)
        for line in lines:
            stream.send((line + "\n").encode())
            time.sleep(0.5)
        stream.finish()
    finally:
        conn.close()


def disk_targets(domain: ET.Element) -> dict[str, str]:
    result = {}
    for d in domain.findall("devices/disk[@device='disk']"):
        tgt, src = d.find("target"), d.find("source")
        if tgt is not None:
            result[tgt.get("dev", "")] = src.get("file", "") if src is not None else ""
    return result


def cdrom_source(domain: ET.Element) -> str | None:
    cdrom = domain.find("devices/disk[@device='cdrom']")
    assert cdrom is not None, "the domain has no cdrom drive"
    src = cdrom.find("source")
    return src.get("file") if src is not None else None


# ---------------------------------------------------------------------------------- tests


async def test_host_facts_and_kvm_detection() -> None:
    driver = LibvirtDriver(URI)
    try:
        facts = await driver.host_facts()
    finally:
        await driver.close()
    print(f"host facts: {facts}; domain type {facts.hypervisor}: {driver.domain_type_reason}")
    assert facts.hypervisor in ("kvm", "qemu")
    assert facts.cpu_num >= 1 and facts.total_memory > 256 << 20
    assert facts.cpu_model
    if os.environ.get("NIMBO_DOMAIN_TYPE", "auto") == "auto":
        usable, reason = probe_kvm()
        assert (facts.hypervisor == "kvm") == usable, reason


async def test_start_reports_running_and_serves_vnc(harness: Harness) -> None:
    name = 'web "01" <prod>\n& friends'
    spec = harness.spec(name, boot_order=["CdRom", "HardDisk"])
    latency = await harness.start(spec)
    harness.latencies["start->Running"] = latency
    assert (await harness.driver.vm_states())[spec.uuid] == RUNNING

    dom = harness.xml(spec.uuid)
    assert dom.findtext("name") == f"nimbo-{spec.uuid}"
    assert dom.findtext("uuid") == str(uuid.UUID(spec.uuid))
    assert dom.findtext(f"metadata/{{{METADATA_NS}}}instance/{{{METADATA_NS}}}name") == name
    assert "\n" not in (dom.findtext("title") or "")
    assert [b.get("dev") for b in dom.findall("os/boot")] == ["cdrom", "hd"]
    assert dom.find("os/smbios").get("mode") == "sysinfo"
    assert dom.findtext("sysinfo/system/entry[@name='product']") == spec.smbios_product
    disk = dom.find("devices/disk[@device='disk']")
    assert disk.find("target").get("dev") == "vda" and disk.find("target").get("bus") == "virtio"
    assert disk.find("driver").get("type") == "qcow2" and disk.find("driver").get("cache") == "none"
    assert cdrom_source(dom) is None
    nic = dom.find("devices/interface")
    assert nic.get("type") == "bridge" and nic.find("source").get("bridge") == harness.bridge
    assert nic.find("mac").get("address") == spec.nics[0].mac
    tap = nic.find("target").get("dev")
    assert tap == "vnic" + spec.nics[0].uuid[:8]
    assert Path(f"/sys/class/net/{harness.bridge}/brif/{tap}").exists(), "tap is not on the bridge"

    addr = await harness.driver.console_address(spec.uuid)
    assert addr.protocol == "vnc" and addr.host_ip == "127.0.0.1" and addr.port >= 5900
    with socket.create_connection(("127.0.0.1", addr.port), timeout=5) as s:
        greeting = s.recv(12)
    assert greeting.startswith(b"RFB 003.00"), greeting
    # VNC is for the agent's console tunnel alone: it listens on the loopback, which open_vnc reaches
    assert dom.find("devices/graphics").get("listen") == "127.0.0.1"
    reader, writer = await harness.driver.open_vnc(spec.uuid)
    try:
        assert (await asyncio.wait_for(reader.readexactly(12), 5)).startswith(b"RFB 003.00")
    finally:
        writer.close()

    if harness.image.tiny:
        await wait_console(spec, "NIMBO-READY", BOOT_TIMEOUT)
        assert "NIMBO-BOOTED-FROM=disk" in console(spec)

    # Idempotent: starting a running VM neither fails nor restarts it.
    await harness.driver.start_vm(spec)
    assert harness.events.states(spec.uuid) == [RUNNING]


async def test_virsh_destroy_and_start_raise_events(harness: Harness) -> None:
    spec = harness.spec()
    await harness.start(spec)
    name = domain_name(spec.uuid)

    # virsh returns once QEMU is gone (under TCG that alone takes ~1-2 s) and the event follows
    # that state change, so latency is measured from virsh's return.
    since = time.monotonic()
    virsh("destroy", name)
    done = time.monotonic()
    total = await harness.events.wait_for(spec.uuid, STOPPED, since, done - since + EVENT_TIMEOUT)
    harness.latencies["virsh destroy (command)"] = done - since
    harness.latencies["virsh destroy returned->Stopped"] = max(0.0, total - (done - since))
    assert (await harness.driver.vm_states())[spec.uuid] == STOPPED  # defined but off

    since = time.monotonic()
    virsh("start", name)
    done = time.monotonic()
    total = await harness.events.wait_for(spec.uuid, RUNNING, since, done - since + EVENT_TIMEOUT)
    harness.latencies["virsh start (command)"] = done - since
    harness.latencies["virsh start returned->Running"] = max(0.0, total - (done - since))
    assert harness.events.states(spec.uuid) == [RUNNING, STOPPED, RUNNING]
    assert harness.latencies["virsh destroy returned->Stopped"] < 0.5
    assert harness.latencies["virsh start returned->Running"] < 0.5


async def test_graceful_stop_and_virsh_shutdown(harness: Harness) -> None:
    needs_guest_os(harness.image)
    spec = harness.spec()
    await harness.boot(spec)

    started = time.monotonic()
    await harness.driver.stop_vm(spec.uuid, graceful=True, timeout=60)
    took = time.monotonic() - started
    await harness.events.wait_for(spec.uuid, STOPPED, started, EVENT_TIMEOUT)
    assert "NIMBO-POWEROFF" in console(spec), "the guest was not shut down through ACPI"
    assert took < 30, f"graceful stop took {took:.1f} s"
    assert (await harness.driver.vm_states())[spec.uuid] == STOPPED
    # Stopping a stopped VM is a no-op.
    await harness.driver.stop_vm(spec.uuid)

    await harness.boot(spec)
    since = time.monotonic()
    virsh("shutdown", domain_name(spec.uuid))
    harness.latencies["virsh shutdown->Stopped (incl. guest power-off)"] = await harness.events.wait_for(
        spec.uuid, STOPPED, since, 30
    )
    assert console(spec).count("NIMBO-POWEROFF") == 1  # the log starts afresh with each boot


async def test_poweroff_inside_guest_raises_stopped(harness: Harness) -> None:
    needs_guest_os(harness.image)
    spec = harness.spec()
    await harness.boot(spec)
    since = time.monotonic()
    typing = asyncio.create_task(asyncio.to_thread(type_on_console, spec.uuid, "", "poweroff"))
    # The guest prints NIMBO-POWEROFF, ends its processes (~0.3 s), syncs and powers off.
    while "NIMBO-POWEROFF" not in console(spec):
        assert time.monotonic() - since < 30, console(spec)[-2000:]
        await asyncio.sleep(0.02)
    said = time.monotonic()
    total = await harness.events.wait_for(spec.uuid, STOPPED, since, 30)
    harness.latencies["guest says NIMBO-POWEROFF->Stopped"] = total - (said - since)
    await typing
    # Stopped comes when the guest powered off, before its QEMU has exited: the state read and a
    # start right away must agree with the event (a start is not taken for "already running").
    assert (await harness.driver.vm_states())[spec.uuid] == STOPPED
    await harness.boot(spec)
    assert (await harness.driver.vm_states())[spec.uuid] == RUNNING


async def test_a_reboot_the_guest_chose_is_reported(harness: Harness) -> None:
    """The management node needs it: a VM installed from an ISO boots from its disk afterwards."""
    needs_guest_os(harness.image)
    spec = harness.spec()
    await harness.boot(spec)
    await asyncio.to_thread(type_on_console, spec.uuid, "", "reboot")
    deadline = time.monotonic() + 30
    while not harness.events.notices(spec.uuid):
        assert time.monotonic() < deadline, "no REBOOTED notice after 'reboot' in the guest"
        await asyncio.sleep(0.05)
    assert STOPPED not in harness.events.states(spec.uuid)
    assert (await harness.driver.vm_states())[spec.uuid] == RUNNING


async def test_stop_forces_off_a_guest_that_ignores_acpi(harness: Harness, tmp_path: Path) -> None:
    # An empty disk: SeaBIOS finds nothing to boot, so nobody answers the power button.
    spec = harness.spec(disk_base=blank_qcow2(tmp_path / "nothing.qcow2"))
    await harness.start(spec)
    started = time.monotonic()
    await harness.driver.stop_vm(spec.uuid, graceful=True, timeout=2)
    took = time.monotonic() - started
    assert 2 <= took < 15, took
    assert (await harness.driver.vm_states())[spec.uuid] == STOPPED
    await harness.events.wait_for(spec.uuid, STOPPED, started, EVENT_TIMEOUT)

    await harness.start(spec)
    # Nobody answers the ACPI reboot either: reboot_vm falls back to a hard reset.
    harness.driver.reboot_timeout = 2
    started = time.monotonic()
    await harness.driver.reboot_vm(spec.uuid)
    assert 2 <= time.monotonic() - started < 10
    assert (await harness.driver.vm_states())[spec.uuid] == RUNNING

    started = time.monotonic()
    await harness.driver.stop_vm(spec.uuid, graceful=False)
    assert time.monotonic() - started < 5
    assert (await harness.driver.vm_states())[spec.uuid] == STOPPED


async def test_pause_and_resume(harness: Harness) -> None:
    spec = harness.spec()
    await harness.start(spec)
    since = time.monotonic()
    await harness.driver.pause_vm(spec.uuid)
    await harness.events.wait_for(spec.uuid, PAUSED, since, EVENT_TIMEOUT)
    assert (await harness.driver.vm_states())[spec.uuid] == PAUSED
    await harness.driver.pause_vm(spec.uuid)  # already paused: no error
    since = time.monotonic()
    await harness.driver.resume_vm(spec.uuid)
    await harness.events.wait_for(spec.uuid, RUNNING, since, EVENT_TIMEOUT)
    assert (await harness.driver.vm_states())[spec.uuid] == RUNNING


async def test_reboot_restarts_the_guest_without_a_stopped_event(harness: Harness) -> None:
    needs_guest_os(harness.image)
    spec = harness.spec()
    await harness.boot(spec)
    started = time.monotonic()
    await harness.driver.reboot_vm(spec.uuid)
    took = time.monotonic() - started
    assert took < harness.driver.reboot_timeout / 2, f"reboot took {took:.1f} s: did it fall back to a reset?"
    await wait_console(spec, "NIMBO-READY", BOOT_TIMEOUT, count=2)
    assert console(spec).count("NIMBO-POWEROFF") == 1  # the ACPI path, not a hard reset
    assert harness.events.states(spec.uuid) == [RUNNING]
    assert (await harness.driver.vm_states())[spec.uuid] == RUNNING


async def test_attach_and_detach_disk_live(harness: Harness) -> None:
    needs_guest_os(harness.image)
    spec = harness.spec()
    await harness.boot(spec)
    data = DiskSpec(
        volume_uuid=uuid.uuid4().hex,
        path=str(blank_qcow2(harness.tmp / "data.qcow2", "48M")),
        device_id=1,
        cache_mode="writeback",
    )
    await harness.driver.attach_disk(spec.uuid, data)
    await wait_console(spec, "NIMBO-DISK-ADDED vdb 50331648", 60)
    assert disk_targets(harness.xml(spec.uuid))["vdb"] == data.path
    assert disk_targets(harness.xml(spec.uuid, inactive=True))["vdb"] == data.path
    await harness.driver.attach_disk(spec.uuid, data)  # again: no-op

    await harness.driver.detach_disk(spec.uuid, data)
    await wait_console(spec, "NIMBO-DISK-REMOVED vdb", 60)
    assert "vdb" not in disk_targets(harness.xml(spec.uuid))
    assert "vdb" not in disk_targets(harness.xml(spec.uuid, inactive=True))
    await harness.driver.detach_disk(spec.uuid, data)  # again: no-op


async def test_attach_disk_to_a_stopped_vm_changes_its_config(harness: Harness) -> None:
    spec = harness.spec()
    await harness.start(spec)
    await harness.driver.stop_vm(spec.uuid, graceful=False)
    data = DiskSpec(volume_uuid=uuid.uuid4().hex, path=str(blank_qcow2(harness.tmp / "data.qcow2", "40M")), device_id=2)
    await harness.driver.attach_disk(spec.uuid, data)
    assert disk_targets(harness.xml(spec.uuid, inactive=True))["vdc"] == data.path
    other = DiskSpec(volume_uuid=uuid.uuid4().hex, path=str(blank_qcow2(harness.tmp / "other.qcow2")), device_id=2)
    with pytest.raises(DriverError) as err:
        await harness.driver.attach_disk(spec.uuid, other)
    assert err.value.code == "DEVICE_BUSY"

    if harness.image.tiny:
        # virsh, not start_vm: start_vm redefines the domain from its spec, which is authoritative.
        virsh("start", domain_name(spec.uuid))
        await wait_console(spec, "NIMBO-READY", BOOT_TIMEOUT)
        # The guest names disks in discovery order: target vdc is its second disk.
        assert "vdb:41943040" in console(spec), console(spec)
        await harness.driver.stop_vm(spec.uuid, graceful=False)
    await harness.driver.detach_disk(spec.uuid, data)
    assert "vdc" not in disk_targets(harness.xml(spec.uuid, inactive=True))


async def test_attach_and_detach_iso(harness: Harness, tmp_path: Path) -> None:
    spec = harness.spec()
    await harness.start(spec)
    if harness.image.iso is not None:
        iso = harness.image.iso
    else:
        iso = tmp_path / "blank.iso"
        iso.write_bytes(b"\0" * (2048 * 64))
    await harness.driver.attach_iso(spec.uuid, str(iso))
    assert cdrom_source(harness.xml(spec.uuid)) == str(iso)
    assert cdrom_source(harness.xml(spec.uuid, inactive=True)) == str(iso)
    await harness.driver.detach_iso(spec.uuid)
    assert cdrom_source(harness.xml(spec.uuid)) is None
    assert cdrom_source(harness.xml(spec.uuid, inactive=True)) is None

    # Stopped: only the configuration changes, and the next boot sees the ISO.
    await harness.driver.stop_vm(spec.uuid, graceful=False)
    await harness.driver.attach_iso(spec.uuid, str(iso))
    assert cdrom_source(harness.xml(spec.uuid, inactive=True)) == str(iso)
    with pytest.raises(DriverError) as err:
        await harness.driver.attach_iso(spec.uuid, str(tmp_path / "missing.iso"))
    assert err.value.code == "ISO_NOT_FOUND"


async def test_boot_from_iso(harness: Harness) -> None:
    needs_guest_os(harness.image)
    assert harness.image.iso is not None
    empty = blank_qcow2(harness.tmp / "empty-base.qcow2")
    spec = harness.spec(disk_base=empty, iso_path=str(harness.image.iso), boot_order=["CdRom", "HardDisk"])
    await harness.start(spec)
    await wait_console(spec, "NIMBO-BOOTED-FROM=iso", BOOT_TIMEOUT)


async def test_destroy_removes_the_domain(harness: Harness) -> None:
    spec = harness.spec()
    await harness.start(spec)
    since = time.monotonic()
    await harness.driver.destroy_vm(spec.uuid)
    await harness.events.wait_for(spec.uuid, STOPPED, since, EVENT_TIMEOUT)
    assert spec.uuid not in await harness.driver.vm_states()
    conn = libvirt.open(URI)
    try:
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(domain_name(spec.uuid))
    finally:
        conn.close()
    await harness.driver.destroy_vm(spec.uuid)  # gone already: no error
    for call in (
        harness.driver.console_address(spec.uuid),
        harness.driver.pause_vm(spec.uuid),
        harness.driver.stop_vm(spec.uuid),
        harness.driver.reboot_vm(spec.uuid),
    ):
        with pytest.raises(DriverError) as err:
            await call
        assert err.value.code == "VM_NOT_FOUND"


async def test_spice_console(harness: Harness) -> None:
    spec = harness.spec(console_mode="spice")
    await harness.start(spec)
    assert harness.xml(spec.uuid).find("devices/video/model").get("type") == "qxl"
    addr = await harness.driver.console_address(spec.uuid)
    assert addr.protocol == "spice" and addr.port > 0
    # A SpiceLinkHeader + SpiceLinkMess for the main channel; the server answers with REDQ.
    mess = struct.pack("<IBBIII", 0, 1, 0, 0, 0, 18)
    header = b"REDQ" + struct.pack("<III", 2, 2, len(mess))
    with socket.create_connection(("127.0.0.1", addr.port), timeout=5) as s:
        s.sendall(header + mess)
        reply = s.recv(4)
    assert reply == b"REDQ", reply
    # the browser console proxies VNC only, and says so
    with pytest.raises(DriverError) as err:
        await harness.driver.open_vnc(spec.uuid)
    assert err.value.code == "CONSOLE_NOT_VNC" and "vm.consoleMode=vnc" in err.value.description


async def test_cpu_modes_follow_the_host(harness: Harness) -> None:
    facts = await harness.driver.host_facts()
    spec = harness.spec(cpu_mode="host-passthrough")
    if facts.hypervisor == "qemu":
        with pytest.raises(DriverError) as err:
            await harness.driver.start_vm(spec)
        assert err.value.code == "HOST_CAPABILITY"
        assert "TCG" in err.value.description
        assert spec.uuid not in await harness.driver.vm_states()
    else:
        await harness.start(spec)
        assert harness.xml(spec.uuid).find("cpu").get("mode") == "host-passthrough"
    model = harness.spec(cpu_mode="host-model")
    await harness.start(model)
    assert harness.xml(model.uuid, inactive=True).find("cpu").get("mode") == "host-model"


async def test_errors_are_driver_errors(harness: Harness, tmp_path: Path) -> None:
    spec = harness.spec()
    spec.nics[0].bridge = "nbt-missing0"
    with pytest.raises(DriverError) as err:
        await harness.driver.start_vm(spec)
    assert err.value.code == "BRIDGE_NOT_FOUND"

    with pytest.raises(DriverError) as err:
        await harness.driver.start_vm(harness.spec(cpu_mode="turbo"))
    assert err.value.code == "INVALID_ARGUMENT"

    with pytest.raises(DriverError) as err:
        await harness.driver.pause_vm("not-a-uuid")
    assert err.value.code == "INVALID_ARGUMENT"

    # A root "qcow2" that is not one: QEMU refuses it and libvirt's reason comes through.
    bogus = tmp_path / "bogus.qcow2"
    bogus.write_bytes(b"this is not a qcow2 image" * 100)
    broken = harness.spec()
    broken.disks[0].path = str(bogus)
    with pytest.raises(DriverError) as err:
        await harness.driver.start_vm(broken)
    assert err.value.code == "LIBVIRT_ERROR"
    assert "start VM" in err.value.description and "qcow2" in str(err.value).lower()

    unreachable = LibvirtDriver("qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    with pytest.raises(DriverError) as err:
        await unreachable.host_facts()
    assert err.value.code == "LIBVIRT_UNAVAILABLE"
    await unreachable.close()


async def test_vm_states_ignores_foreign_domains(harness: Harness) -> None:
    ours = harness.spec()
    await harness.start(ours)
    foreign_uuid = uuid.uuid4()
    imposter_hex = uuid.uuid4().hex  # our naming scheme but a different libvirt UUID
    conn = libvirt.open(URI)
    defined = []
    try:
        for name, dom_uuid in (
            (f"other-{foreign_uuid.hex[:8]}", foreign_uuid),
            (f"nimbo-{imposter_hex}", uuid.uuid4()),
        ):
            xml = (
                f"<domain type='qemu'><name>{name}</name><uuid>{dom_uuid}</uuid>"
                "<memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os></domain>"
            )
            defined.append(conn.defineXML(xml))
        states = await harness.driver.vm_states()
        assert states.get(ours.uuid) == RUNNING
        assert imposter_hex not in states
        assert all(len(k) == 32 for k in states)
    finally:
        for dom in defined:
            dom.undefine()
        conn.close()
