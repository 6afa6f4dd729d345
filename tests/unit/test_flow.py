"""Flow chains roll back to the end, even when the API's deadline passes during the rollback."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nimbostack.core import deadline
from nimbostack.core.flow import FlowChain


async def _noop(c: dict[str, Any]) -> None:
    return None


async def _fail(c: dict[str, Any]) -> None:
    raise RuntimeError("step failed")


async def test_rollback_runs_in_reverse_and_the_error_stays() -> None:
    undone: list[str] = []

    async def undo_a(c: dict[str, Any]) -> None:
        undone.append("a")

    async def undo_b(c: dict[str, Any]) -> None:
        undone.append("b")
        raise RuntimeError("rollback failed too")  # logged, does not stop the rest

    chain = FlowChain("t").then("a", _noop, undo_a).then("b", _noop, undo_b).then("c", _fail)
    with pytest.raises(RuntimeError, match="step failed"):
        await chain.run({})
    assert undone == ["b", "a"]


async def test_a_timeout_during_the_rollback_does_not_cut_it_short() -> None:
    undone: list[str] = []
    budgets: list[float] = []

    async def slow_undo(c: dict[str, Any]) -> None:
        await asyncio.sleep(0.3)  # the API's timeout fires meanwhile
        budgets.append(deadline.remaining())
        undone.append("slow")

    async def undo(c: dict[str, Any]) -> None:
        undone.append("first")

    chain = FlowChain("t").then("a", _noop, undo).then("b", _noop, slow_undo).then("c", _fail)
    deadline.set_deadline(0.1)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await chain.run({})
    assert undone == ["slow", "first"]
    # the rollback had a fresh budget for its agent calls, not what was left of the API's
    assert budgets and budgets[0] > deadline.ROLLBACK_GRACE - 5
