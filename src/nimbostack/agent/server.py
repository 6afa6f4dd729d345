"""The host agent's HTTP server: the only way the management node reaches a host.

Every command is ``POST /<path>`` with a JSON body that names ``hostUuid``; every answer is
``{"success": true, ...}`` or ``{"success": false, "error": {code, description, details}}``.
A simulator agent serves many hosts (one SimulatorDriver each) over the same wire."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from nimbostack.agent.backup import BackupStore
from nimbostack.agent.bridge import ensure_bridge
from nimbostack.agent.driver import DriverError, HypervisorDriver
from nimbostack.agent.storage import LocalStorage, PullFile
from nimbostack.wire import DEADLINE_HEADER, DiskSpec, NicSpec, VmSpec

log = logging.getLogger(__name__)

DriverFactory = Callable[[str, dict[str, Any]], HypervisorDriver]


class Agent:
    def __init__(self, driver_factory: DriverFactory, storage: LocalStorage, multi_host: bool,
                 console_dir: str | None = None, path_map: list[tuple[str, str]] | None = None) -> None:
        self.console_dir = console_dir  # where guests' serial consoles are logged
        self.driver_factory = driver_factory
        self.storage = storage
        self.multi_host = multi_host  # simulator: one driver per host uuid
        # (path the management node names, path on this machine), as a bind mount would map them:
        # several agents on one machine keep their "local" storage apart this way
        self.path_map = sorted(((_norm(a), _norm(b)) for a, b in path_map or []), key=lambda p: -len(p[0]))
        self._sim_stores: dict[str, LocalStorage] = {}
        self.roots: set[str] = set()  # primary storage urls the management node named here
        self.migrations: list[dict[str, Any]] = []  # simulator: the live migrations it recorded
        self.drivers: dict[str, HypervisorDriver] = {}
        self.backup = BackupStore()
        self.management_url: str | None = None
        self._http = httpx.AsyncClient(timeout=10)
        # events are posted as tasks of their own; with hundreds at once in httpx's pool, its
        # bookkeeping (every queued request against every connection, on each request) cost more
        # than all the agent's other work. A few at a time keep that queue short.
        self._event_slots = asyncio.Semaphore(8)
        self._pending_events: list[dict[str, Any]] = []
        # host-side services (e.g. "flat": network namespaces, dnsmasq, metadata), closed with the agent
        self.extensions: dict[str, Any] = {}

    def real(self, path: str) -> str:
        """The path on this machine of a path the management node names (``--path-map``)."""
        return _remap(path, self.path_map)

    def logical(self, path: str) -> str:
        """The inverse of ``real``: the path the management node knows."""
        return _remap(path, sorted(((b, a) for a, b in self.path_map), key=lambda p: -len(p[0])))

    def store(self, host_uuid: str, shared: bool = False) -> LocalStorage:
        """The files of a host's storage. Real: the one file system. Simulated: one store per
        simulated host for local storage, one for every host for shared (mounted) storage."""
        if not self.storage.simulate:
            return self.storage
        if not self.multi_host:
            return self.storage
        return self._sim_stores.setdefault("*shared*" if shared else host_uuid, LocalStorage(simulate=True))

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
            async with self._event_slots:
                await self._http.post(f"{self.management_url}/agent/events", json=event)
        except httpx.HTTPError as err:
            log.warning("could not report %s: %s (the management node reconciles on its next ping)", event, err)

    async def close(self) -> None:
        for ext in self.extensions.values():
            await ext.close()
        for d in self.drivers.values():
            await d.close()
        await self._http.aclose()


def _norm(path: str) -> str:
    return os.path.normpath(path) if path else path


def _remap(path: str, pairs: list[tuple[str, str]]) -> str:
    for src, dst in pairs:
        if src == "/":
            return dst.rstrip("/") + path
        if path == src or path.startswith(src + "/"):
            return dst + path[len(src):]
    return path


def _vm_spec(a: Agent, raw: dict[str, Any]) -> VmSpec:
    raw = dict(raw)
    raw["disks"] = [_disk(a, d) for d in raw.get("disks", [])]
    raw["nics"] = [NicSpec(**n) for n in raw.get("nics", [])]
    if raw.get("iso_path"):
        raw["iso_path"] = a.real(raw["iso_path"])
    return VmSpec(**raw)


def _disk(a: Agent, raw: dict[str, Any]) -> DiskSpec:
    disk = DiskSpec(**raw)
    disk.path = a.real(disk.path)
    return disk


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


async def _plug(a: Agent, spec: VmSpec) -> list[str]:
    """What a VM needs on this host besides its domain: its L2 bridges, a console log."""
    warnings: list[str] = []
    if not a.multi_host:  # simulated hosts have no bridges
        for nic in spec.nics:
            warnings += await ensure_bridge(nic.bridge, nic.physical_interface, nic.vlan)
        if a.console_dir:
            Path(a.console_dir).mkdir(parents=True, exist_ok=True)
            spec.console_log = spec.console_log or str(Path(a.console_dir) / f"{spec.uuid}.log")
    for w in warnings:
        log.warning("VM %s: %s", spec.uuid, w)
    return warnings


@command("/vm/start")
async def _start(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    spec = _vm_spec(a, b["vm"])
    warnings = await _plug(a, spec)
    await a.driver(b["hostUuid"]).start_vm(spec)
    return {"warnings": warnings}


@command("/vm/prepare-migration")
async def _prepare_migration(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    """On the destination, before a live migration: the incoming domain plugs into bridges that
    must exist already (libvirt does not create them)."""
    spec = _vm_spec(a, b["vm"])
    warnings = await _plug(a, spec)
    return {"warnings": warnings, "consoleLog": spec.console_log}


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
    await a.driver(b["hostUuid"]).attach_disk(b["vmUuid"], _disk(a, b["disk"]))
    return {}


@command("/vm/detach-disk")
async def _detach_disk(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).detach_disk(b["vmUuid"], _disk(a, b["disk"]))
    return {}


@command("/vm/attach-iso")
async def _attach_iso(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).attach_iso(b["vmUuid"], a.real(b["isoPath"]))
    return {}


@command("/vm/detach-iso")
async def _detach_iso(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).detach_iso(b["vmUuid"])
    return {}


@command("/vm/console")
async def _console(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    addr = await a.driver(b["hostUuid"]).console_address(b["vmUuid"])
    return {"hostIp": addr.host_ip, "port": addr.port, "protocol": addr.protocol}


@command("/vm/migrate")
async def _migrate(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    """Live migration to another host. Real: libvirt migrates the running domain to ``destUri``
    (peer to peer, shared storage). Simulated: the domain moves to the destination's driver
    (on this agent) and the move is recorded."""
    source, dest, vm = b["hostUuid"], b["destHostUuid"], b["vmUuid"]
    driver = a.driver(source)
    if a.multi_host:
        target = a.drivers.get(dest)
        if target is None:
            raise DriverError("HOST_NOT_CONNECTED", "the destination host is not connected to this agent", dest)
        await driver.migrate_vm(vm, b.get("destUri", ""), dest, target)
        a.migrations.append({"vmUuid": vm, "from": source, "to": dest, "at": time.time()})
    else:
        await driver.migrate_vm(vm, b["destUri"], dest, None, b.get("destConsoleLog"))
    return {}


# Primary storages kept as files: /storage/local/* (LocalStorage: a share on each host) and
# /storage/smp/* (SharedMountPoint: one file system every host has mounted) take the same
# commands; the body's "path" is the storage's url, paths are absolute and inside it.
StorageCommand = Callable[[Agent, dict[str, Any], LocalStorage, bool], Awaitable[dict[str, Any]]]


def storage_command(name: str) -> Callable[[StorageCommand], StorageCommand]:
    def register(fn: StorageCommand) -> StorageCommand:
        for prefix, shared in (("/storage/local", False), ("/storage/smp", True)):

            async def run(a: Agent, b: dict[str, Any], fn: StorageCommand = fn, shared: bool = shared
                          ) -> dict[str, Any]:
                a.roots.add(_norm(b["path"]))
                return await fn(a, b, a.store(b["hostUuid"], shared), shared)

            COMMANDS[f"{prefix}/{name}"] = run
        return fn

    return register


@storage_command("init")
async def _ls_init(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    root = a.real(b["path"])
    if shared and not st.simulate and not os.path.isdir(root):
        raise DriverError("STORAGE_NOT_MOUNTED", "the shared mount point is not there",
                          f"{root} does not exist on this host; mount the shared file system there first")
    total, available = await st.capacity(root, b.get("simulatedCapacity") or (1 << 40))
    if not shared:  # a shared file system may be in the middle of another host's copy
        st.clean_partials(root)
    return {"totalCapacity": total, "availableCapacity": available}


@storage_command("create-root")
async def _ls_root(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    root, path = a.real(b["path"]), a.real(b["installPath"])
    if b.get("empty"):
        actual = await st.create_empty(root, path, b["size"])
    else:
        cache = await st.cache_image(root, b["imageUuid"], b["imageUrl"], b.get("md5"))
        actual = await st.create_from_image(root, path, cache, b.get("size", 0))
    return {"actualSize": actual}


@storage_command("create-empty")
async def _ls_empty(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    return {"actualSize": await st.create_empty(a.real(b["path"]), a.real(b["installPath"]), b["size"])}


@storage_command("cache-image")
async def _ls_cache(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    cache = await st.cache_image(a.real(b["path"]), b["imageUuid"], b["imageUrl"], b.get("md5"))
    return {"cachePath": a.logical(cache)}


@storage_command("delete")
async def _ls_delete(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    await st.delete(a.real(b["path"]), a.real(b["installPath"]))
    return {}


@storage_command("info")
async def _ls_info(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    out = await st.info(a.real(b["path"]), a.real(b["installPath"]))
    if out.get("backing"):
        out["backing"] = a.logical(str(out["backing"]))
    return out


@storage_command("snapshot")
async def _ls_snapshot(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    """Take a snapshot: ``installPath`` (the volume's file) is frozen and the volume continues in
    ``newInstallPath`` on top of it. A running VM switches files live (``vmUuid``, ``disk``)."""
    root, old, new = a.real(b["path"]), a.real(b["installPath"]), a.real(b["newInstallPath"])
    if b.get("vmUuid"):
        disk = _disk(a, b["disk"])
        await a.driver(b["hostUuid"]).snapshot_disk(b["vmUuid"], disk, new)
        if st.simulate:
            st.files[new], st.backing[new] = 0, old
    else:
        await st.overlay(root, old, new)
    return {"size": st.actual_size(old)}


@storage_command("overlay")
async def _ls_overlay(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    await st.overlay(a.real(b["path"]), a.real(b["backing"]), a.real(b["installPath"]))
    return {}


@storage_command("rebase")
async def _ls_rebase(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    backing = a.real(b["backing"]) if b.get("backing") else None
    return {"actualSize": await st.rebase(a.real(b["path"]), a.real(b["installPath"]), backing)}


@storage_command("pull")
async def _ls_pull(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    """Copy a volume's files from another host's agent (``sourceUrl``, ``sourceHostUuid``), which
    serves them at GET /storage/file."""
    root = a.real(b["path"])
    files = [
        PullFile(a.real(f["installPath"]), f["installPath"], a.real(f["backing"]) if f.get("backing") else None,
                 bool(f.get("skipIfExists")))
        for f in b["files"]
    ]

    def fetch(f: PullFile) -> str:
        query = urlencode({"hostUuid": b["sourceHostUuid"], "root": b["path"], "path": f.source_path})
        return f"{b['sourceUrl']}/storage/file?{query}"

    source = a.store(b["sourceHostUuid"], shared) if st.simulate else None
    sizes = await st.pull(root, files, fetch, source)
    return {"sizes": {a.logical(k): v for k, v in sizes.items()}}


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

    @app.get("/storage/file")
    async def storage_file(hostUuid: str, root: str, path: str) -> Response:  # noqa: N803
        """Another host's agent copies a volume's file from here (LocalStorageMigrateVolume)."""
        try:
            if _norm(root) not in agent.roots:  # only files of this host's primary storages
                raise DriverError("STORAGE_ERROR", "not a primary storage of this host", root)
            return FileResponse(agent.store(hostUuid).file(agent.real(root), agent.real(path)))
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
            refused = await guard.before(agent, "/" + path, body, request.headers.get(DEADLINE_HEADER), received)
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
