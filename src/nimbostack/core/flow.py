"""Flow chains: a multi-step operation whose completed steps are undone in reverse on failure."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nimbostack.core import deadline
from nimbostack.db.engine import StorageFull

log = logging.getLogger(__name__)

Step = Callable[[dict[str, Any]], Awaitable[None]]

# how often an undo that the database refused for want of space is tried again
STORAGE_RETRY = 1.0


async def until_stored(undo: Callable[[], Awaitable[None]]) -> None:
    """Run an undo that writes the database, again while the database's disk is full, until the
    current deadline (a rollback's grace). A full disk fails every write, the undo's too: given up
    at once, it left what the failed operation had taken (reserved capacity, IPs, rows) behind for
    good, while space usually returns within the grace as an operator frees it."""
    while True:
        try:
            await undo()
            return
        except StorageFull:
            if deadline.remaining() <= STORAGE_RETRY:
                raise
            log.info("an undo waits for the database's disk to have space again")
            await asyncio.sleep(STORAGE_RETRY)


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
            await self._undo(done, ctx)
            raise
        return ctx

    async def _undo(self, done: list[Flow], ctx: dict[str, Any]) -> None:
        """Roll back in reverse, to the end even when the API's deadline passes meanwhile: the
        rollback runs as its own task (a cancellation of the API waits for it instead of cutting
        it short) with a fresh deadline, as the API's own may already be spent."""
        with deadline.grace():
            task = asyncio.ensure_future(self._rollback(done, ctx))
        cancelled = False
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    async def _rollback(self, done: list[Flow], ctx: dict[str, Any]) -> None:
        for flow in reversed(done):
            if flow.rollback is None:
                continue
            try:
                await until_stored(functools.partial(flow.rollback, ctx))
            except Exception:
                # A rollback that fails must not hide the original error; it is logged so the
                # operator can act on it (host-side leftovers of unreachable hosts go to the GC).
                log.exception("rollback of %s/%s failed", self.name, flow.name)
