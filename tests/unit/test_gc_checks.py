"""The garbage collector's check before it destroys a VM's domain on a host: it skips only a VM
that lives on that host again, never one whose destroy is still finishing."""

from __future__ import annotations

from typing import Any

import pytest

from nimbostack.core import gc
from nimbostack.db import models as m


class _OneVm:
    def __init__(self, vm: m.VmInstance | None) -> None:
        self.vm = vm

    async def get(self, model: Any, uuid: str) -> m.VmInstance | None:
        return self.vm if self.vm is not None and uuid == self.vm.uuid else None


@pytest.mark.parametrize(
    ("state", "host", "skipped"),
    [
        ("Destroying", "h1", False),  # the deferring destroy has not marked it Destroyed yet
        ("Destroyed", "h1", False),
        ("Expunging", "h1", False),
        ("Running", "h1", True),  # recovered and started there again: its domain is the live one
        ("Migrating", "h1", True),
        ("Running", "h2", False),  # runs elsewhere (migrated): the copy on h1 is a leftover
    ],
)
async def test_destroy_vm_entry_skips_only_a_vm_living_on_the_host(state: str, host: str, skipped: bool) -> None:
    vm = m.VmInstance(uuid="vm1", state=state, hostUuid=host)
    entry = m.GarbageCollector(uuid="g1", name=gc.DESTROY_VM, hostUuid="h1", resourceUuid="vm1")
    reason = await gc.CHECKS[gc.DESTROY_VM](_OneVm(vm), entry, {"vmUuid": "vm1"})  # type: ignore[arg-type]
    assert (reason is not None) == skipped, reason


async def test_destroy_vm_entry_runs_for_a_vm_that_is_gone() -> None:
    entry = m.GarbageCollector(uuid="g1", name=gc.DESTROY_VM, hostUuid="h1", resourceUuid="vm1")
    assert await gc.CHECKS[gc.DESTROY_VM](_OneVm(None), entry, {"vmUuid": "vm1"}) is None  # type: ignore[arg-type]
