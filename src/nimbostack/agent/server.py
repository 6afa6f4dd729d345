"""The host agent's HTTP server: the only way the management node reaches a host.

Every command is ``POST /<path>`` with a JSON body that names ``hostUuid``; every answer is
``{"success": true, ...}`` or ``{"success": false, "error": {code, description, details}}``.
A simulator agent serves many hosts (one SimulatorDriver each) over the same wire."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from nimbostack.agent.backup import BackupStore
from nimbostack.agent.bridge import ensure_bridge
from nimbostack.agent.driver import DiskSpec, DriverError, HypervisorDriver, NicSpec, VmSpec
from nimbostack.agent.storage import LocalStorage
from nimbostack.core import deadline

log = logging.getLogger(__name__)

DriverFactory = Callable[[str, dict[str, Any]], HypervisorDriver]


class Agent:
    def __init__(self, driver_factory: DriverFactory, storage: LocalStorage, multi_host: bool,
                 console_dir: str | None = None) -> None:
        self.console_dir = console_dir  # where guests' serial consoles are logged
        self.driver_factory = driver_factory
        self.storage = storage
        self.multi_host = multi_host  # simulator: one driver per host uuid
        self.drivers: dict[str, HypervisorDriver] = {}
        self.backup = BackupStore()
        self.management_url: str | None = None
        self._http = httpx.AsyncClient(timeout=10)
        self._pending_events: list[dict[str, Any]] = []
        # host-side services (e.g. "flat": network namespaces, dnsmasq, metadata), closed with the agent
        self.extensions: dict[str, Any] = {}

    def driver(self, host_uuid: str) -> HypervisorDriver:
        key = host_uuid if self.multi_host else "local"
        d = self.drivers.get(key)
        if d is None:
            raise DriverError(
                "HOST_NOT_CONNECTED",
                "the host is not connected to this agent",
                f"host {host_uuid}: call /host/connect first",
            )
        return d

    async def connect(self, host_uuid: str, body: dict[str, Any]) -> dict[str, Any]:
        self.management_url = body.get("managementUrl") or self.management_url
        key = host_uuid if self.multi_host else "local"
        if key not in self.drivers:
            driver = self.driver_factory(host_uuid, body)
            driver.on_state_change(lambda vm, state, h=host_uuid: self.report(h, vm, state))
            self.drivers[key] = driver
        facts = await self.drivers[key].host_facts()
        return {"facts": asdict(facts)}

    async def report(self, host_uuid: str, vm_uuid: str, state: str) -> None:
        """Push a VM state change to the management node; keep it for retry if that fails."""
        if not self.management_url:
            return
        event = {"hostUuid": host_uuid, "vmUuid": vm_uuid, "state": state}
        asyncio.get_running_loop().create_task(self._post_event(event))

    async def _post_event(self, event: dict[str, Any]) -> None:
        try:
            await self._http.post(f"{self.management_url}/agent/events", json=event)
        except httpx.HTTPError as err:
            log.warning("could not report %s: %s (the management node reconciles on its next ping)", event, err)

    async def close(self) -> None:
        for ext in self.extensions.values():
            await ext.close()
        for d in self.drivers.values():
            await d.close()
        await self._http.aclose()


def _vm_spec(raw: dict[str, Any]) -> VmSpec:
    raw = dict(raw)
    raw["disks"] = [DiskSpec(**d) for d in raw.get("disks", [])]
    raw["nics"] = [NicSpec(**n) for n in raw.get("nics", [])]
    return VmSpec(**raw)


Command = Callable[[Agent, dict[str, Any]], Awaitable[dict[str, Any]]]
COMMANDS: dict[str, Command] = {}


def command(path: str) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        COMMANDS[path] = fn
        return fn

    return register


@command("/host/connect")
async def _connect(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    return await a.connect(b["hostUuid"], b)


@command("/host/ping")
async def _ping(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    key = b["hostUuid"] if a.multi_host else "local"
    # "connected": false tells the management node this agent restarted and needs /host/connect
    return {"connected": key in a.drivers}


@command("/vm/start")
async def _start(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    spec = _vm_spec(b["vm"])
    warnings: list[str] = []
    if not a.multi_host:  # simulated hosts have no bridges
        for nic in spec.nics:
            warnings += await ensure_bridge(nic.bridge, nic.physical_interface, nic.vlan)
        if a.console_dir and not spec.console_log:
            spec.console_log = str(Path(a.console_dir) / f"{spec.uuid}.log")
    await a.driver(b["hostUuid"]).start_vm(spec)
    for w in warnings:
        log.warning("VM %s: %s", spec.uuid, w)
    return {"warnings": warnings}


@command("/vm/stop")
async def _stop(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).stop_vm(b["vmUuid"], b.get("graceful", True), b.get("timeout", 60))
    return {}


@command("/vm/reboot")
async def _reboot(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).reboot_vm(b["vmUuid"])
    return {}


@command("/vm/pause")
async def _pause(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).pause_vm(b["vmUuid"])
    return {}


@command("/vm/resume")
async def _resume(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).resume_vm(b["vmUuid"])
    return {}


@command("/vm/destroy")
async def _destroy(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).destroy_vm(b["vmUuid"])
    return {}


@command("/vm/states")
async def _states(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    return {"states": await a.driver(b["hostUuid"]).vm_states()}


@command("/vm/attach-disk")
async def _attach_disk(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).attach_disk(b["vmUuid"], DiskSpec(**b["disk"]))
    return {}


@command("/vm/detach-disk")
async def _detach_disk(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).detach_disk(b["vmUuid"], DiskSpec(**b["disk"]))
    return {}


@command("/vm/attach-iso")
async def _attach_iso(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).attach_iso(b["vmUuid"], b["isoPath"])
    return {}


@command("/vm/detach-iso")
async def _detach_iso(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).detach_iso(b["vmUuid"])
    return {}


@command("/vm/console")
async def _console(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    addr = await a.driver(b["hostUuid"]).console_address(b["vmUuid"])
    return {"hostIp": addr.host_ip, "port": addr.port, "protocol": addr.protocol}


@command("/storage/local/init")
async def _ls_init(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    total, available = await a.storage.capacity(b["path"], b.get("simulatedCapacity") or (1 << 40))
    return {"totalCapacity": total, "availableCapacity": available}


@command("/storage/local/create-root")
async def _ls_root(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    root = b["path"]
    if b.get("empty"):
        actual = await a.storage.create_empty(root, b["installPath"], b["size"])
    else:
        cache = await a.storage.cache_image(root, b["imageUuid"], b["imageUrl"], b.get("md5"))
        actual = await a.storage.create_from_image(root, b["installPath"], cache, b.get("size", 0))
    return {"actualSize": actual}


@command("/storage/local/create-empty")
async def _ls_empty(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    return {"actualSize": await a.storage.create_empty(b["path"], b["installPath"], b["size"])}


@command("/storage/local/cache-image")
async def _ls_cache(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    return {"cachePath": await a.storage.cache_image(b["path"], b["imageUuid"], b["imageUrl"], b.get("md5"))}


@command("/storage/local/delete")
async def _ls_delete(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.storage.delete(b["path"], b["installPath"])
    return {}


@command("/bs/connect")
async def _bs_connect(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    total, available = await a.backup.capacity(b["path"])
    return {"totalCapacity": total, "availableCapacity": available}


@command("/bs/download")
async def _bs_download(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    return await a.backup.download(b["path"], b["imageUuid"], b["url"], b["format"], b.get("md5"))


@command("/bs/progress")
async def _bs_progress(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    return {"progress": a.backup.progress.get(b["imageUuid"])}


@command("/bs/delete")
async def _bs_delete(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.backup.delete(b["path"], b["installPath"])
    return {}


def create_app(agent: Agent) -> FastAPI:
    from nimbostack.agent import guard  # registers /simulator/*; deadlines and simulated faults
    from nimbostack.agent.flat import commands as _flat  # noqa: F401  (registers /flat/*)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        yield
        await agent.close()

    app = FastAPI(title="nimbostack host agent", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.agent = agent

    @app.get("/bs/file")
    async def bs_file(root: str, path: str) -> Response:
        """Primary storages fetch images from here (the only GET of the wire)."""
        try:
            return FileResponse(agent.backup.file(root, path))
        except DriverError as err:
            return JSONResponse({"success": False, "error": {"code": err.code, "description": err.description,
                                                             "details": err.details}}, status_code=404)

    @app.post("/{path:path}")
    async def dispatch(path: str, request: Request) -> JSONResponse:
        received = time.monotonic()
        fn = COMMANDS.get("/" + path)
        if fn is None:
            return JSONResponse(
                {
                    "success": False,
                    "error": {"code": "AGENT_UNKNOWN_COMMAND", "description": "unknown agent command", "details": path},
                }
            )
        try:
            body = await request.json()
            refused = await guard.before(agent, "/" + path, body, request.headers.get(deadline.HEADER), received)
            if refused is not None:
                return refused
            result = await fn(agent, body)
            return JSONResponse({"success": True, **result})
        except DriverError as err:
            return JSONResponse(
                {"success": False, "error": {"code": err.code, "description": err.description, "details": err.details}}
            )
        except (KeyError, TypeError, ValueError) as err:
            return JSONResponse(
                {
                    "success": False,
                    "error": {
                        "code": "AGENT_BAD_COMMAND",
                        "description": "malformed agent command",
                        "details": repr(err),
                    },
                }
            )
        except Exception as err:
            log.exception("agent command %s failed", path)
            return JSONResponse(
                {
                    "success": False,
                    "error": {
                        "code": "AGENT_INTERNAL",
                        "description": "agent internal error",
                        "details": f"{type(err).__name__}: {err}",
                    },
                }
            )

    return app
