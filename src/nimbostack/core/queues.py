"""A serial queue per resource: operations on one resource run one at a time, in arrival order;
operations on different resources run in parallel. Replaces locks held across I/O."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class SerialQueues:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiters: dict[str, int] = {}

    @asynccontextmanager
    async def serial(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()  # asyncio.Lock wakes waiters in FIFO order
        self._waiters[key] = self._waiters.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._waiters[key] -= 1
            if self._waiters[key] == 0:  # forget idle queues so memory tracks in-flight work only
                del self._waiters[key]
                del self._locks[key]

    def pending(self) -> int:
        return sum(self._waiters.values())
