"""What the agent checks before it runs a command.

* The caller's deadline: the management node sends what is left of the API's timeout in the
  ``X-Nimbo-Timeout`` header (seconds). A command still waiting when that has passed is not
  started — its caller has given up and rolled back, so running it would leave things behind.
* Simulated faults (the simulator agent only, ``multi_host``): tests make a host slow, failing or
  unreachable per command with ``/simulator/fault``::

      {"hostUuid": H, "path": "/vm/start", "delay": 3}          # answer 3 s late
      {"hostUuid": H, "path": "/vm/start", "error": "boom"}     # fail with SIMULATED_FAULT
      {"hostUuid": H, "path": "*", "unreachable": true}         # HTTP 503: as if the host were down
      {"hostUuid": H, "path": "/host/ping", "unreachable": true, "times": 1}  # the next one only
      {"hostUuid": H, "clear": true}                            # remove H's faults ("*" for all)

  ``path`` ``*`` matches every command but ``/simulator/*``. ``/simulator/state {hostUuid}`` shows
  the simulated host: its domains and their disks, the files of its simulated local storage and
  of the simulated shared storage, the live migrations it took part in. ``/simulator/facts
  {hostUuid, cpuModel}`` changes what the host reports at its next connect.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from nimbostack.agent.driver import DriverError
from nimbostack.agent.host import Agent, command

# (hostUuid, path) → {"delay": s, "error": text, "unreachable": bool}; per agent object
_FAULTS: dict[int, dict[tuple[str, str], dict[str, Any]]] = {}


def faults(agent: Agent) -> dict[tuple[str, str], dict[str, Any]]:
    return _FAULTS.setdefault(id(agent), {})


def _simulator_only(agent: Agent) -> None:
    if not agent.multi_host:
        raise DriverError("AGENT_UNKNOWN_COMMAND", "simulator commands exist on the simulator agent only")


@command("/simulator/fault")
async def _fault(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    _simulator_only(a)
    table = faults(a)
    host = b.get("hostUuid") or "*"
    if b.get("clear"):
        for key in [k for k in table if host == "*" or k[0] == host]:
            del table[key]
        return {"faults": len(table)}
    fault = {k: b[k] for k in ("delay", "error", "unreachable", "times") if b.get(k) is not None}
    if not fault:
        raise DriverError("AGENT_BAD_COMMAND", "a fault needs delay, error or unreachable (or clear)")
    table[(host, b.get("path") or "*")] = fault
    return {"faults": len(table)}


@command("/simulator/state")
async def _state(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    _simulator_only(a)
    driver = a.drivers.get(b["hostUuid"])
    return {
        "connected": driver is not None,
        "domains": dict(getattr(driver, "domains", {})) if driver is not None else {},
        "disks": {vm: [d.path for d in spec.disks] for vm, spec in getattr(driver, "specs", {}).items()},
        "nics": {vm: [n.mac for n in spec.nics] for vm, spec in getattr(driver, "specs", {}).items()},
        "files": sorted(a.store(b["hostUuid"]).files) if a.storage.simulate else [],
        "sharedFiles": sorted(a.store(b["hostUuid"], shared=True).files) if a.storage.simulate else [],
        "migrations": [m for m in a.migrations if b["hostUuid"] in (m["from"], m["to"])],
    }


@command("/simulator/facts")
async def _facts(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    """Change what a simulated host reports at its next connect, e.g. ``{"cpuModel": "..."}``."""
    _simulator_only(a)
    driver = a.drivers.get(b["hostUuid"])
    if driver is None:
        raise DriverError("HOST_NOT_CONNECTED", "the simulated host is not connected", b["hostUuid"])
    if b.get("cpuModel") is not None:
        driver.facts.cpu_model = str(b["cpuModel"])  # type: ignore[attr-defined]
    return {}


def _match(agent: Agent, host: str, path: str) -> dict[str, Any] | None:
    if not agent.multi_host or path.startswith("/simulator/"):
        return None
    table = _FAULTS.get(id(agent))
    if not table:
        return None
    for key in ((host, path), (host, "*"), ("*", path), ("*", "*")):
        if key in table:
            fault = table[key]
            if "times" in fault:  # a fault for the next N commands: used up, it goes
                fault["times"] = int(fault["times"]) - 1
                if fault["times"] <= 0:
                    del table[key]
            return fault
    return None


async def host_answers(agent: Agent, host: str, path: str) -> bool:
    """For a command that answers for many simulated hosts at once (``/host/ping-batch``): the
    host's own fault for ``path``, as ``before`` applies it to a command of that host alone. False:
    the host is unreachable or failing, and is left out of the answer."""
    fault = _match(agent, host, path)
    if fault is None:
        return True
    if fault.get("delay"):
        await asyncio.sleep(float(fault["delay"]))
    return not (fault.get("unreachable") or fault.get("error"))


async def before(agent: Agent, path: str, body: dict[str, Any], budget: str | None, received: float) -> Any:
    """None to run the command; otherwise the answer to send instead."""
    fault = _match(agent, str(body.get("hostUuid") or ""), path) if isinstance(body, dict) else None
    if fault is not None:
        if fault.get("delay"):
            await asyncio.sleep(float(fault["delay"]))
        if fault.get("unreachable"):
            return web.json_response({"success": False, "error": {"code": "SIMULATED_UNREACHABLE",
                                      "description": "the host is unreachable (simulated)", "details": path}},
                                     status=503)
        if fault.get("error"):
            raise DriverError("SIMULATED_FAULT", str(fault["error"]), path)
    if budget:
        try:
            late = time.monotonic() - received - float(budget)
        except ValueError:
            late = 0.0
        if late > 0:
            raise DriverError("AGENT_DEADLINE_PASSED", "the caller's deadline passed before the command ran",
                              f"{path} started {late:.1f} s after its {float(budget):.1f} s budget; not run")
    return None
