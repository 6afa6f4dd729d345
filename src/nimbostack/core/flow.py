"""Flow chains: a multi-step operation whose completed steps are undone in reverse on failure."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Step = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Flow:
    name: str
    run: Step
    rollback: Step | None = None


class FlowChain:
    """Run flows in order over a shared context dict; on an exception roll back what ran."""

    def __init__(self, name: str, flows: list[Flow] | None = None) -> None:
        self.name = name
        self.flows: list[Flow] = list(flows or [])

    def then(self, name: str, run: Step, rollback: Step | None = None) -> FlowChain:
        self.flows.append(Flow(name, run, rollback))
        return self

    async def run(self, ctx: dict[str, Any]) -> dict[str, Any]:
        done: list[Flow] = []
        try:
            for flow in self.flows:
                done.append(flow)
                await flow.run(ctx)
        except BaseException as err:
            log.info("flow chain %s failed at %s: %s; rolling back", self.name, done[-1].name, err)
            for flow in reversed(done):
                if flow.rollback is None:
                    continue
                try:
                    await flow.rollback(ctx)
                except Exception:
                    # A rollback that fails must not hide the original error; it is logged so the
                    # operator (and the GC, for host-side leftovers) can act on it.
                    log.exception("rollback of %s/%s failed", self.name, flow.name)
            raise
        return ctx
