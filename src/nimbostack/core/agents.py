"""The management node's side of the agent wire: HTTP calls with the API's deadline."""

from __future__ import annotations

import logging
from typing import Any

import httpx

from nimbostack.core import deadline
from nimbostack.core.errors import AGENT_ERROR, HOST_DISCONNECTED, TIMEOUT, ApiError

log = logging.getLogger(__name__)


class AgentClient:
    def __init__(self) -> None:
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=100)
        self._http = httpx.AsyncClient(limits=limits, timeout=None)

    async def call(
        self, agent_url: str, path: str, body: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """POST a command; the timeout is what is left of the current API's deadline."""
        budget = min(timeout, deadline.remaining()) if timeout else deadline.remaining()
        try:
            # the agent learns the budget too, and does not start a command its caller gave up on
            resp = await self._http.post(
                f"{agent_url}{path}", json=body, timeout=budget, headers={deadline.HEADER: f"{budget:.3f}"}
            )
        except httpx.TimeoutException:
            raise ApiError(
                TIMEOUT,
                "The host agent did not answer in time",
                f"{path} on {agent_url} took longer than {budget:.1f} s",
            ) from None
        except httpx.HTTPError as err:
            raise ApiError(HOST_DISCONNECTED, "Cannot reach the host agent", f"{agent_url}{path}: {err}") from None
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
        await self._http.aclose()
