"""The ``/sg/*`` agent commands.

* ``/sg/apply`` {hostUuid, full, vmUuids, nics: [{nicUuid, vmUuid, ingress, egress}], remove}:
  ``full``: the host's whole security group table is exactly ``nics``; otherwise the ``nics``
  chains are rewritten, the chains of the ``remove`` NICs and the other NICs of ``vmUuids`` go.
  Each rule is {protocol, startPort, endPort, allowedCidr}.
* ``/sg/state`` {hostUuid}: what is applied (the recorded NICs on simulated hosts)."""

from __future__ import annotations

import os
from typing import Any

from nimbostack.agent.host import Agent, command
from nimbostack.plugins.security_group.host.service import SgService


def sg_service(agent: Agent) -> SgService:
    """The agent's SecurityGroup service, made on first use (tests may put their own in
    ``agent.extensions["security_group"]``); NIMBOSTACK_SG_TABLE / _STATE_DIR configure it."""
    svc = agent.extensions.get("security_group")
    if svc is None:
        svc = agent.extensions["security_group"] = SgService(
            agent,
            table=os.environ.get("NIMBOSTACK_SG_TABLE", "nimbo_sg"),
            state_dir=os.environ.get("NIMBOSTACK_SG_STATE_DIR", "/run/nimbostack/sg"),
        )
    return svc


@command("/sg/apply")
async def _apply(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    return await sg_service(a).apply(b)


@command("/sg/state")
async def _state(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    return await sg_service(a).state(b["hostUuid"])
