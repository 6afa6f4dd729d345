"""A hypervisor without a hypervisor: keeps domain states in memory. One agent process holds one
SimulatorDriver per simulated host, so hundreds of hosts cost a few kilobytes each."""

from __future__ import annotations

import asyncio
import socket
import struct

from nimbostack.agent.driver import DriverError, StateListener
from nimbostack.wire import PAUSED, RUNNING, STOPPED, ConsoleAddress, DiskSpec, HostFacts, NicSpec, VmSpec


class SimulatorDriver:
    def __init__(
        self, cpu_num: int = 8, cpu_speed: int = 2600, memory: int = 16 << 30, host_ip: str = "127.0.0.1"
    ) -> None:
        self.facts = HostFacts(cpu_num, cpu_speed, memory, "simulator", "simulated", "simulator")
        self.host_ip = host_ip
        self.domains: dict[str, str] = {}
        self.specs: dict[str, VmSpec] = {}
        self._listeners: list[StateListener] = []
        self._ports: dict[str, int] = {}
        self._fake_vnc: set[asyncio.Task[None]] = set()

    async def host_facts(self) -> HostFacts:
        return self.facts

    def _need(self, vm_uuid: str) -> None:
        if vm_uuid not in self.domains:
            raise DriverError("VM_NOT_FOUND", f"no domain for VM {vm_uuid} on this host")

    async def _set(self, vm_uuid: str, state: str) -> None:
        self.domains[vm_uuid] = state
        for listener in self._listeners:
            await listener(vm_uuid, state)

    async def start_vm(self, spec: VmSpec) -> None:
        self.specs[spec.uuid] = spec
        self._ports.setdefault(spec.uuid, 5900 + len(self._ports))
        await self._set(spec.uuid, RUNNING)

    async def stop_vm(self, vm_uuid: str, graceful: bool = True, timeout: float = 60) -> None:
        self._need(vm_uuid)
        await self._set(vm_uuid, STOPPED)

    async def reboot_vm(self, vm_uuid: str) -> None:
        self._need(vm_uuid)
        await asyncio.sleep(0)

    async def pause_vm(self, vm_uuid: str) -> None:
        self._need(vm_uuid)
        await self._set(vm_uuid, PAUSED)

    async def resume_vm(self, vm_uuid: str) -> None:
        self._need(vm_uuid)
        await self._set(vm_uuid, RUNNING)

    async def destroy_vm(self, vm_uuid: str) -> None:
        self.domains.pop(vm_uuid, None)
        self.specs.pop(vm_uuid, None)
        self._ports.pop(vm_uuid, None)

    async def vm_states(self) -> dict[str, str]:
        return dict(self.domains)

    async def attach_disk(self, vm_uuid: str, disk: DiskSpec) -> None:
        self._need(vm_uuid)
        self.specs[vm_uuid].disks.append(disk)

    async def detach_disk(self, vm_uuid: str, disk: DiskSpec) -> None:
        self._need(vm_uuid)
        spec = self.specs[vm_uuid]
        spec.disks = [d for d in spec.disks if d.volume_uuid != disk.volume_uuid]

    async def attach_nic(self, vm_uuid: str, nic: NicSpec) -> None:
        self._need(vm_uuid)
        nics = self.specs[vm_uuid].nics
        if all(n.mac != nic.mac for n in nics):  # a retried attach: libvirt's driver keeps one too
            nics.append(nic)

    async def detach_nic(self, vm_uuid: str, nic: NicSpec) -> None:
        self._need(vm_uuid)
        spec = self.specs[vm_uuid]
        spec.nics = [n for n in spec.nics if n.mac != nic.mac]

    async def attach_iso(self, vm_uuid: str, iso_path: str) -> None:
        self._need(vm_uuid)
        self.specs[vm_uuid].iso_path = iso_path

    async def detach_iso(self, vm_uuid: str) -> None:
        self._need(vm_uuid)
        self.specs[vm_uuid].iso_path = None

    async def console_address(self, vm_uuid: str) -> ConsoleAddress:
        self._need(vm_uuid)
        return ConsoleAddress(self.host_ip, self._ports[vm_uuid], self.specs[vm_uuid].console_mode)

    async def open_vnc(self, vm_uuid: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A simulated host has no VNC server: a fake one says so in RFB's own words (the 3.8
        greeting, then a handshake that offers no security type, with the reason), so the whole
        console path up to the guest is exercised and a browser shows the reason."""
        address = await self.console_address(vm_uuid)
        if address.protocol != "vnc":
            raise DriverError(
                "CONSOLE_NOT_VNC",
                f"VM {vm_uuid} has a {address.protocol} console; the browser console needs kvm vm.consoleMode=vnc.",
            )
        ours, theirs = socket.socketpair()
        task = asyncio.create_task(_refusing_rfb_server(theirs))
        self._fake_vnc.add(task)
        task.add_done_callback(self._fake_vnc.discard)
        return await asyncio.open_connection(sock=ours)

    async def snapshot_disk(self, vm_uuid: str, disk: DiskSpec, new_path: str) -> None:
        self._need(vm_uuid)
        for d in self.specs[vm_uuid].disks:
            if d.volume_uuid == disk.volume_uuid:
                d.path = new_path
                return
        raise DriverError("VOLUME_NOT_FOUND", f"VM {vm_uuid} has no disk {disk.volume_uuid}")

    async def migrate_vm(
        self, vm_uuid: str, dest_uri: str, dest_host_uuid: str, dest: object | None, console_log: str | None = None
    ) -> None:
        self._need(vm_uuid)
        if self.domains[vm_uuid] not in (RUNNING, PAUSED):
            raise DriverError("VM_NOT_RUNNING", f"VM {vm_uuid} is {self.domains[vm_uuid]}; only a running VM migrates")
        if not isinstance(dest, SimulatorDriver):
            raise DriverError("HOST_NOT_CONNECTED", f"destination host {dest_host_uuid} is not simulated here")
        spec = self.specs.pop(vm_uuid)
        self.domains.pop(vm_uuid)
        self._ports.pop(vm_uuid, None)
        await dest.start_vm(spec)

    def on_state_change(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    async def close(self) -> None:
        self.domains.clear()


SIMULATED_VNC_REASON = "no VNC on a simulated host"


async def _refusing_rfb_server(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"RFB 003.008\n")
        await writer.drain()
        await reader.readexactly(12)  # the client's version
        reason = SIMULATED_VNC_REASON.encode()
        # RFB 3.8 section 7.1.2: zero security types, then the reason the connection failed
        writer.write(b"\x00" + struct.pack(">I", len(reason)) + reason)
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
