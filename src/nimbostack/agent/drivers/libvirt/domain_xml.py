"""Building and reading libvirt domain XML: pure functions of specs and XML text, no libvirt connection."""

from __future__ import annotations

import uuid as uuidlib
import xml.etree.ElementTree as ET

from nimbostack.agent.driver import DriverError
from nimbostack.wire import DiskSpec, NicSpec, VmSpec

# Domains are named ``nimbo-<32 hex vm uuid>`` and carry the VM uuid as their libvirt UUID, so a
# domain is recognised as ours from its name and UUID alone (no extra round trip per domain).
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

ET.register_namespace(METADATA_PREFIX, METADATA_NS)


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


def interface_xml(nic: NicSpec) -> str:
    """The <interface> a hot-plug attaches (attachDeviceFlags): the same device a start defines,
    so a NIC plugged live and the same NIC after a restart are one and the same to the guest."""
    return ET.tostring(interface_element(nic), encoding="unicode")


def find_interface(domain: ET.Element, mac: str) -> ET.Element | None:
    """The domain's interface with this MAC (libvirt matches a detach by MAC too)."""
    for el in domain.findall("devices/interface"):
        found = el.find("mac")
        if found is not None and (found.get("address") or "").lower() == mac.lower():
            return el
    return None


# where a VM's VNC server listens on its host: the agent's console tunnel is its only client
VNC_LISTEN = "127.0.0.1"


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

    # VNC is reached only through the platform's console proxy (the agent's /vm/vnc tunnel), so it
    # listens on the host's loopback alone; SPICE has no proxy and its clients connect directly
    listen = VNC_LISTEN if spec.console_mode == "vnc" else console_listen
    graphics = _sub(devices, "graphics", type=spec.console_mode, autoport="yes", listen=listen)
    _sub(graphics, "listen", type="address", address=listen)
    video = _sub(devices, "video")
    model = video_model or ("qxl" if spec.console_mode == "spice" else "vga")
    _sub(video, "model", type=model, heads="1", primary="yes")
    # An absolute pointer keeps the VNC/SPICE mouse in sync with the guest's.
    _sub(devices, "input", type="tablet", bus="usb")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    _sub(devices, "memballoon", model="virtio")
    return ET.tostring(dom, encoding="unicode")


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


def set_console_log(xml: str, path: str) -> str:
    """The domain XML logging its serial console to ``path``, appended to: the destination of a
    migration keeps its own log of the guest, and a guest coming back adds to the old one."""
    dom = ET.fromstring(xml)
    for log_el in dom.findall("devices/serial/log"):
        log_el.set("file", path)
        log_el.set("append", "on")
    return ET.tostring(dom, encoding="unicode")


def find_disk(domain: ET.Element, path: str, target: str) -> ET.Element | None:
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


def disk_snapshot_xml(domain: ET.Element, dev: str | None, new_path: str) -> str:
    """The snapshot XML that moves the disk of ``domain`` at target ``dev`` to a new qcow2 file
    ``new_path`` (external, disk only) and leaves its other disks alone."""
    snap = ET.Element("domainsnapshot")
    _sub(snap, "name", f"nimbo-{uuidlib.uuid4().hex}")
    disks = _sub(snap, "disks")
    for d in domain.findall("devices/disk"):
        t = d.find("target")
        if t is None or not t.get("dev"):
            continue
        if t.get("dev") == dev:
            el = _sub(disks, "disk", name=dev, snapshot="external", type="file")
            _sub(el, "driver", type="qcow2")
            _sub(el, "source", file=new_path)
        else:
            _sub(disks, "disk", name=t.get("dev", ""), snapshot="no")
    return ET.tostring(snap, encoding="unicode")
