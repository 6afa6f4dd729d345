"""The management node's side of the agent wire: HTTP calls with the API's deadline."""

from __future__ import annotations

import logging
from typing import Any

import httpx

from nimbostack.core import deadline
from nimbostack.core.errors import AGENT_ERROR, HOST_DISCONNECTED, TIMEOUT, ApiError

log = logging.getLogger(__name__)


class AgentClient:
    # httpcore's pool bookkeeping walks every connection of the pool (and, for each idle one, every
    # connection again) on each request, so one pool of a few hundred connections cost milliseconds
    # per call under load. Several small pools, the least busy one taken, keep the same 400 calls
    # in flight at a fraction of the cost.
    POOLS, PER_POOL = 16, 25

    def __init__(self) -> None:
        # idle connections are dropped long before the agent's keep-alive (60 s) ends, so a command
        # is never sent on a connection the agent is closing at that very moment
        limits = httpx.Limits(
            max_connections=self.PER_POOL, max_keepalive_connections=self.PER_POOL, keepalive_expiry=2.0
        )
        self._pools = [httpx.AsyncClient(limits=limits, timeout=None) for _ in range(self.POOLS)]
        self._busy = [0] * self.POOLS

    async def call(
        self, agent_url: str, path: str, body: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """POST a command; the timeout is what is left of the current API's deadline."""
        budget = min(timeout, deadline.remaining()) if timeout else deadline.remaining()
        pool = min(range(self.POOLS), key=self._busy.__getitem__)
        self._busy[pool] += 1
        try:
            # the agent learns the budget too, and does not start a command its caller gave up on
            resp = await self._pools[pool].post(
                f"{agent_url}{path}", json=body, timeout=budget, headers={deadline.HEADER: f"{budget:.3f}"}
            )
        except httpx.TimeoutException:
            raise ApiError(
                TIMEOUT,
                "The host agent did not answer in time",
                f"{path} on {agent_url} took longer than {budget:.1f} s",
            ) from None
        except httpx.HTTPError as err:
            # some transport errors have no message: name at least their kind
            why = str(err) or type(err).__name__
            raise ApiError(HOST_DISCONNECTED, "Cannot reach the host agent", f"{agent_url}{path}: {why}") from None
        finally:
            self._busy[pool] -= 1
        if resp.status_code in (502, 503, 504):  # a proxy, or the agent itself, says it cannot serve now
            raise ApiError(
                HOST_DISCONNECTED, "Cannot reach the host agent", f"{agent_url}{path}: HTTP {resp.status_code}"
            )
        if resp.status_code != 200:
            raise ApiError(AGENT_ERROR, "The host agent failed", f"{path}: HTTP {resp.status_code} {resp.text[:300]}")
        data = resp.json()
        if not data.get("success"):
            err = data.get("error") or {}
            raise ApiError(
                AGENT_ERROR,
                f"The host agent failed: {err.get('description', 'unknown error')}",
                f"{err.get('code', '')} {err.get('details', '')}".strip(),
            )
        return data

    async def close(self) -> None:
        for client in self._pools:
            await client.aclose()
