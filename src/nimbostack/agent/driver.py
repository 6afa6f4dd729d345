"""The narrow interface every hypervisor driver of the host agent implements.

The agent's commands (``nimbostack.agent.commands``, served by ``nimbostack.agent.server``) turn
wire commands into calls on a driver; the management node never sees a driver directly. Two
drivers exist: ``simulator`` (no hypervisor, many hosts per process) and ``libvirt`` (real QEMU
guests).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from nimbostack.wire import ConsoleAddress, DiskSpec, HostFacts, NicSpec, VmSpec


class DriverError(Exception):
    """A failure the driver can explain; ``code`` is a stable error code for the API."""

    def __init__(self, code: str, description: str, details: str = "") -> None:
        super().__init__(f"{code}: {description} {details}".strip())
        self.code = code
        self.description = description
        self.details = details


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

    async def attach_nic(self, vm_uuid: str, nic: NicSpec) -> None:
        """Hot-plug a NIC (live, and into the definition); a NIC with its MAC already there is kept."""

    async def detach_nic(self, vm_uuid: str, nic: NicSpec) -> None:
        """Unplug the NIC with ``nic.mac``; no error when it is not there."""

    async def attach_iso(self, vm_uuid: str, iso_path: str) -> None: ...

    async def detach_iso(self, vm_uuid: str) -> None: ...

    async def console_address(self, vm_uuid: str) -> ConsoleAddress: ...

    async def open_vnc(self, vm_uuid: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the VM's VNC server on this host (the console proxy's tunnel relays
        it); DriverError CONSOLE_NOT_VNC when the VM's console is another protocol."""

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
