"""Typed extension points the services register into: what runs before a VM starts on a host (with
its release), when a running VM gains or loses a NIC, when a host connects, and when a resource's
system tags change.

A VM start extension comes as a pair, like ZStack's PreVmInstantiateResourceExtensionPoint with its
preReleaseVmResource: whatever ``before_start`` set up on a host (a DHCP entry, an nft chain, an EIP
rule) its ``release`` takes down again. A failed or rolled-back start calls ``release`` (in the
create flow, as the rollback of the step that ran ``before_start``), so nothing stays behind.

``before_start`` may also hand back agent commands (StartCommand) instead of sending them: a start
that can (``start_vm``) sends them inside its ``/vm/start``, where the agent runs them before the
domain starts — one round trip to the host instead of one per extension."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nimbostack.core.errors import AGENT_ERROR, ApiError
from nimbostack.core.hosts import agent

if TYPE_CHECKING:
    from nimbostack.core.context import ApiContext
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class StartCommand:
    """An agent command that prepares a host for a VM, for the agent to run before the domain
    starts. ``refused``: the agent's error code with which the host says it cannot take the
    command as it is (it needs more than this one VM's part); ``recover`` then sends what it needs
    on its own, and the start goes ahead without this command."""

    path: str
    body: dict[str, Any]
    refused: str | None = None
    recover: Callable[[], Awaitable[None]] | None = None


VmHook = Callable[["Platform", str, str], Awaitable[None]]  # (platform, vm uuid, host uuid)
# (platform, vm uuid, host uuid, the host's agent URL when the caller has just read it, or None):
# what it set up itself, or the commands the start is to carry (None: nothing to carry)
StartHook = Callable[["Platform", str, str, "str | None"], Awaitable["Sequence[StartCommand] | None"]]
HostHook = Callable[["Platform", str], Awaitable[None]]  # (platform, host uuid)
TagHook = Callable[["ApiContext", str, str], Awaitable[None]]  # (ctx, resource type, resource uuid)
# (platform, vm uuid, host uuid, l3 uuid): what the host serves the running VM on that L3 network
# changed in the database (a NIC added or removed, the VM's default network moved); the host's
# network services of that L3 follow it
NicHook = Callable[["Platform", str, str, str], Awaitable[None]]


@dataclass(frozen=True)
class VmStartExtension:
    """``before_start`` prepares a host for a VM before its domain starts; ``release`` undoes it
    when the VM stops, is destroyed, leaves the host (migration) or its start fails. ``release``
    must succeed when ``before_start`` never ran or ran only in part."""

    name: str
    before_start: StartHook
    release: VmHook


VM_START: list[VmStartExtension] = []
HOST_CONNECT: list[HostHook] = []
NIC_CHANGE: list[NicHook] = []
TAG_CHANGE: list[TagHook] = []


def on_vm_start(ext: VmStartExtension) -> None:
    VM_START.append(ext)


def on_host_connect(hook: HostHook, *, first: bool = False) -> None:
    """``first``: before the others (the GC, so that what waited for the host is done before
    storage capacity is read and network services are pushed)."""
    HOST_CONNECT.insert(0, hook) if first else HOST_CONNECT.append(hook)


def on_tag_change(hook: TagHook) -> None:
    TAG_CHANGE.append(hook)


def on_nic_change(hook: NicHook) -> None:
    NIC_CHANGE.append(hook)


async def before_start(
    p: Platform, vm_uuid: str, host_uuid: str, agent_url: str | None = None, *, defer: bool = False
) -> list[StartCommand]:
    """Every extension's ``before_start``, in order. A caller whose start fails after this began
    (here or later) calls ``release``: each release is safe for an extension that never ran.
    ``agent_url``: the host's, when the caller has just read the host (spares each extension's
    commands a read of it). ``defer``: the commands the extensions hand back are returned for the
    caller's ``start_vm`` to carry; otherwise they are sent here, one by one."""
    carried: list[StartCommand] = []
    for ext in VM_START:
        commands = await ext.before_start(p, vm_uuid, host_uuid, agent_url) or ()
        if defer:
            carried.extend(commands)
        else:
            await send(p, host_uuid, commands, agent_url)
    return carried


async def prepare_one(p: Platform, ext: VmStartExtension, vm_uuid: str, host_uuid: str) -> None:
    """One extension's ``before_start`` with its commands sent (a VM that already runs on the host:
    the destination of a migration)."""
    await send(p, host_uuid, await ext.before_start(p, vm_uuid, host_uuid, None) or (), None)


async def send(p: Platform, host_uuid: str, commands: Sequence[StartCommand], agent_url: str | None) -> None:
    for command in commands:
        try:
            await agent(p, host_uuid, command.path, command.body, agent_url)
        except ApiError as err:
            if not _refused(command, err):
                raise
            assert command.recover is not None
            await command.recover()


async def start_vm(
    p: Platform, host_uuid: str, vm: dict[str, Any], commands: Sequence[StartCommand], agent_url: str | None = None
) -> dict[str, Any]:
    """``/vm/start`` of the VM's spec on the host, carrying the extensions' commands. A command the
    host refuses as it is gets its ``recover``, and the start is sent again without it (the ones
    before it ran already: they set a state, and run again harmlessly)."""
    body = {"vm": vm, "before": [{"path": c.path, "body": c.body} for c in commands]}
    try:
        return await agent(p, host_uuid, "/vm/start", body, agent_url)
    except ApiError as err:
        refused = next((c for c in commands if _refused(c, err)), None)
        if refused is None:
            raise
        assert refused.recover is not None
        await refused.recover()
        return await start_vm(p, host_uuid, vm, [c for c in commands if c is not refused], agent_url)


def _refused(command: StartCommand, err: ApiError) -> bool:
    return (
        command.refused is not None
        and command.recover is not None
        and err.code == AGENT_ERROR
        and err.details.split(" ", 1)[0] == command.refused
    )


async def release(p: Platform, vm_uuid: str, host_uuid: str | None, *, strict: bool = False) -> None:
    """Every extension's ``release``, last registered first. ``strict``: the first failure is
    raised (a stop that must report it); otherwise failures are logged, and what a release left
    behind is cleaned when the host reconnects (its providers resync the host's whole state)."""
    if host_uuid is None:
        return
    if strict:
        for ext in reversed(VM_START):
            await ext.release(p, vm_uuid, host_uuid)
        return
    for ext in reversed(VM_START):
        try:
            await ext.release(p, vm_uuid, host_uuid)
        except Exception as err:
            log.warning("releasing %s of VM %s on host %s failed: %s", ext.name, vm_uuid, host_uuid, err)


async def nic_changed(p: Platform, vm_uuid: str, host_uuid: str, l3_uuid: str) -> None:
    """Every NIC hook, in order; the first failure is raised: a NIC attach whose DHCP entry
    cannot be served fails (and is rolled back) rather than leaving a guest without an address."""
    for hook in NIC_CHANGE:
        await hook(p, vm_uuid, host_uuid, l3_uuid)


async def host_connected(p: Platform, host_uuid: str) -> None:
    for hook in HOST_CONNECT:
        await hook(p, host_uuid)


async def tags_changed(ctx: ApiContext, resource_type: str, resource_uuid: str) -> None:
    for hook in TAG_CHANGE:
        await hook(ctx, resource_type, resource_uuid)


def off_vm_start(ext: VmStartExtension) -> None:
    if ext in VM_START:
        VM_START.remove(ext)


def off_host_connect(hook: HostHook) -> None:
    if hook in HOST_CONNECT:
        HOST_CONNECT.remove(hook)


def off_nic_change(hook: NicHook) -> None:
    if hook in NIC_CHANGE:
        NIC_CHANGE.remove(hook)


def off_tag_change(hook: TagHook) -> None:
    if hook in TAG_CHANGE:
        TAG_CHANGE.remove(hook)
