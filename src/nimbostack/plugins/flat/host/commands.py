"""The ``/flat/*`` agent commands. Imported by ``nimbostack.agent.server``.

* ``/flat/apply``   {hostUuid, l3: {...}, vms: [...]}: the full desired state of one L3 network
  on this host (idempotent; replaces what was there)
* ``/flat/apply-vm`` {hostUuid, vmUuid, l3: {...}, vms: [...]}: one VM's entries added to what
  ``/flat/apply`` set up on this host (FLAT_FULL_STATE_NEEDED when there is nothing to add to)
* ``/flat/release`` {hostUuid, l3Uuid}: remove everything of that L3 network from this host
* ``/flat/sync``    {hostUuid, l3Uuids}: release every L3 network of this host not listed
* ``/flat/state``   {hostUuid}: what is applied (the recorded bodies on simulated hosts)
* ``/flat/eip/apply`` / ``/flat/eip/release``: distributed EIP (see ``eip.py``)
"""

from __future__ import annotations

import os
from typing import Any

from nimbostack.agent.host import Agent, command
from nimbostack.plugins.flat.host.eip import EipService
from nimbostack.plugins.flat.host.service import FlatService


def flat_service(agent: Agent) -> FlatService:
    """The agent's Flat service, made on first use. Tests (or ``main``) may put a configured one
    in ``agent.extensions["flat"]`` first; NIMBOSTACK_FLAT_PREFIX / _STATE_DIR configure it."""
    svc = agent.extensions.get("flat")
    if svc is None:
        svc = agent.extensions["flat"] = FlatService(
            agent,
            prefix=os.environ.get("NIMBOSTACK_FLAT_PREFIX", "nimbo-"),
            state_dir=os.environ.get("NIMBOSTACK_FLAT_STATE_DIR", "/run/nimbostack/flat"),
        )
    return svc


@command("/flat/apply")
async def _apply(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    return await flat_service(a).apply(b)


@command("/flat/apply-vm", start_step=True)
async def _apply_vm(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    return await flat_service(a).add_vm(b)


@command("/flat/release")
async def _release(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    return await flat_service(a).release(b["hostUuid"], b["l3Uuid"], b.get("seq"))


@command("/flat/sync")
async def _sync(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    keep = b.get("l3Uuids") or []
    if not isinstance(keep, list):
        raise ValueError("l3Uuids must be a list")
    return await flat_service(a).sync(b["hostUuid"], keep)


@command("/flat/state")
async def _state(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    return {"l3s": flat_service(a).state(b["hostUuid"])}


def eip_service(agent: Agent) -> EipService:
    svc = agent.extensions.get("flat-eip")
    if svc is None:
        svc = agent.extensions["flat-eip"] = EipService(flat_service(agent))
    return svc


@command("/flat/eip/sync")
async def _eip_sync(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    return await eip_service(a).sync(b["hostUuid"], b.get("eips") or [])


@command("/flat/eip/state")
async def _eip_state(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    return {"eips": eip_service(a).state(b["hostUuid"])}
