"""Typed extension points the services register into: what runs before a VM starts on a host (with
its release), when a running VM gains or loses a NIC, when a host connects, and when a resource's
system tags change.

A VM start extension comes as a pair, like ZStack's PreVmInstantiateResourceExtensionPoint with its
preReleaseVmResource: whatever ``before_start`` set up on a host (a DHCP entry, an nft chain, an EIP
rule) its ``release`` takes down again. A failed or rolled-back start calls ``release`` (in the
create flow, as the rollback of the step that ran ``before_start``), so nothing stays behind."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nimbostack.core.context import ApiContext
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

VmHook = Callable[["Platform", str, str], Awaitable[None]]  # (platform, vm uuid, host uuid)
# (platform, vm uuid, host uuid, the host's agent URL when the caller has just read it, or None)
StartHook = Callable[["Platform", str, str, "str | None"], Awaitable[None]]
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


async def before_start(p: Platform, vm_uuid: str, host_uuid: str, agent_url: str | None = None) -> None:
    """Every extension's ``before_start``, in order. A caller whose start fails after this began
    (here or later) calls ``release``: each release is safe for an extension that never ran.
    ``agent_url``: the host's, when the caller has just read the host (spares each extension's
    commands a read of it)."""
    for ext in VM_START:
        await ext.before_start(p, vm_uuid, host_uuid, agent_url)


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
