"""The narrow interface every hypervisor driver of the host agent implements.

The agent's HTTP server (``nimbostack.agent.server``) turns wire commands into calls on a
driver; the management node never sees a driver directly. Two drivers exist: ``simulator``
(no hypervisor, many hosts per process) and ``libvirt`` (real QEMU guests).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol


class DriverError(Exception):
    """A failure the driver can explain; ``code`` is a stable error code for the API."""

    def __init__(self, code: str, description: str, details: str = "") -> None:
        super().__init__(f"{code}: {description} {details}".strip())
        self.code = code
        self.description = description
        self.details = details


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

StateListener = Callable[[str, str], Awaitable[None]]  # (vm_uuid, new_state)


class HypervisorDriver(Protocol):
    """One host's hypervisor. The simulator keeps one instance per simulated host."""

    async def host_facts(self) -> HostFacts: ...

    async def start_vm(self, spec: VmSpec) -> None:
        """Define (or redefine) and start the domain; idempotent if it already runs."""

    async def stop_vm(self, vm_uuid: str, graceful: bool = True, timeout: float = 60) -> None:
        """ACPI shutdown and wait up to ``timeout``; then (or if not graceful) force off."""

    async def reboot_vm(self, vm_uuid: str) -> None: ...

    async def pause_vm(self, vm_uuid: str) -> None: ...

    async def resume_vm(self, vm_uuid: str) -> None: ...

    async def destroy_vm(self, vm_uuid: str) -> None:
        """Force off and undefine; no error if the domain does not exist."""

    async def vm_states(self) -> dict[str, str]:
        """State of every domain this driver manages (by VM uuid)."""

    async def attach_disk(self, vm_uuid: str, disk: DiskSpec) -> None: ...

    async def detach_disk(self, vm_uuid: str, disk: DiskSpec) -> None: ...

    async def attach_iso(self, vm_uuid: str, iso_path: str) -> None: ...

    async def detach_iso(self, vm_uuid: str) -> None: ...

    async def console_address(self, vm_uuid: str) -> ConsoleAddress: ...

    async def snapshot_disk(self, vm_uuid: str, disk: DiskSpec, new_path: str) -> None:
        """Live external snapshot of one disk of a running VM: ``disk.path`` is frozen and the
        guest writes to a new qcow2 file ``new_path`` on top of it from now on."""

    async def migrate_vm(
        self, vm_uuid: str, dest_uri: str, dest_host_uuid: str, dest: object | None, console_log: str | None = None
    ) -> None:
        """Live-migrate a running VM to another host (shared storage). ``dest`` is the
        destination's driver when both hosts live in this process (the simulator);
        ``console_log`` where the destination logs the guest's serial console."""

    def on_state_change(self, listener: StateListener) -> None:
        """Register the callback the agent uses to push state changes to the management node."""

    async def close(self) -> None: ...
