"""The expunger (release 1.0 §8): resources deleted under the ``Delay`` policy are expunged —
their files removed on the hosts (through the GC when a host is unreachable) and their rows
dropped — once they have been deleted for longer than ``<category>/expungePeriod``. Each
category is scanned every ``<category>/expungeInterval`` seconds; both are re-read each round.

The policy in force when the scan runs decides: a category whose ``deletionPolicy`` is ``Never``
is never expunged (what was deleted stays recoverable); ``Delay`` and ``Direct`` expunge what is due.

Resource families register an :class:`Expungeable` (vm, image, volume); nothing here knows them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

TICK = 1.0  # seconds between two looks at the intervals, so a changed interval takes effect soon


@dataclass
class Expungeable:
    category: str  # the global config category: vm | image | volume
    due: Callable[[Platform, datetime], Awaitable[list[str]]]  # uuids deleted before the cutoff
    expunge: Callable[[Platform, str], Awaitable[None]]  # expunge one (re-checks its state)


REGISTRY: list[Expungeable] = []


def register(e: Expungeable) -> None:
    REGISTRY.append(e)


async def run_once(p: Platform, category: str | None = None) -> int:
    """One scan (of one category or all); returns how many resources were expunged."""
    n = 0
    for e in REGISTRY:
        if category and e.category != category:
            continue
        if await p.config.get(e.category, "deletionPolicy") == "Never":
            continue
        period = await p.config.get(e.category, "expungePeriod")
        cutoff = datetime.utcnow() - timedelta(seconds=period)
        for uuid in await e.due(p, cutoff):
            try:
                await e.expunge(p, uuid)
                n += 1
                log.info("expunged %s %s (deleted more than %s s ago)", e.category, uuid, period)
            except Exception as err:  # tried again next round
                log.warning("expunging %s %s failed: %s", e.category, uuid, err)
    return n


async def expunge_loop(p: Platform) -> None:
    last: dict[str, float] = {}
    while True:
        try:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            for category in dict.fromkeys(e.category for e in REGISTRY):
                started = last.setdefault(category, now)
                if now - started >= await p.config.get(category, "expungeInterval"):
                    last[category] = now
                    await run_once(p, category)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("expunge round failed")
