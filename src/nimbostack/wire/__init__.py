"""The management node <-> host agent contract: what a command carries (VM, disk and NIC specs,
host facts, console address), the VM states agents report, and the header that carries an agent
call's deadline. Both sides import this package; neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata

# The header that carries an agent call's budget (seconds) to the agent, which then refuses to
# start a command whose caller has already given up.
DEADLINE_HEADER = "X-Nimbo-Timeout"

try:
    # the release both sides run: an agent reports it on connect and ping, and the node deploys its
    # own over SSH to a host whose agent says another (compute/deploy.py)
    VERSION = metadata.version("nimbostack")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0+unknown"


@dataclass
class HostFacts:
    cpu_num: int
    cpu_speed_mhz: int
    total_memory: int  # bytes
    hypervisor: str  # "kvm" | "qemu" | "simulator"
    cpu_model: str = ""
    os: str = ""


@dataclass
class DiskSpec:
    volume_uuid: str
    path: str  # qcow2 file (or ISO file for a cdrom)
    device_id: int  # 0 = root; data disks 1..n
    format: str = "qcow2"
    cache_mode: str = "none"  # none | writethrough | writeback


@dataclass
class NicSpec:
    uuid: str
    mac: str
    bridge: str  # Linux bridge the tap joins
    device_id: int
    ip: str = ""
    netmask: str = ""
    gateway: str = ""
    l3_uuid: str = ""
    # the L2 behind the bridge, so the agent can create the bridge where it is missing
    physical_interface: str = ""
    vlan: int | None = None


@dataclass
class VmSpec:
    uuid: str
    name: str
    cpu_num: int
    memory: int  # bytes
    disks: list[DiskSpec]
    nics: list[NicSpec]
    iso_path: str | None = None  # attached ISO (a cdrom device is always present)
    boot_order: list[str] = field(default_factory=lambda: ["HardDisk"])  # HardDisk | CdRom
    console_mode: str = "vnc"  # vnc | spice
    cpu_mode: str = "none"  # none | host-model | host-passthrough
    # SMBIOS product name; "CloudStack ..." makes stock cloud-init pick its CloudStack datasource.
    smbios_product: str = "CloudStack KVM Hypervisor"
    # Where the guest's serial console is written, so tests and operators can read it.
    console_log: str | None = None


@dataclass
class ConsoleAddress:
    host_ip: str
    port: int
    protocol: str


# VM states reported by drivers, named as the VmInstance inventory names them.
RUNNING = "Running"
STOPPED = "Stopped"
PAUSED = "Paused"
# not a state: the guest reset itself (reported so ISO installs can switch to the disk)
REBOOTED = "Rebooted"
