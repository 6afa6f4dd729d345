"""The host agent's state (Agent), its command registry (COMMANDS, command, storage_command) and path remapping."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from nimbostack.agent.backup import BackupStore
from nimbostack.agent.driver import DriverError, HypervisorDriver
from nimbostack.agent.storage import LocalStorage
from nimbostack.wire.pki import Credentials, CredentialsError, write_private

log = logging.getLogger(__name__)

DriverFactory = Callable[[str, dict[str, Any]], HypervisorDriver]
# how long the state a command brings a VM to is expected: a later change of the same kind is news
EXPECT_SECONDS = 30.0


class Agent:
    def __init__(self, driver_factory: DriverFactory, storage: LocalStorage, multi_host: bool,
                 credentials: Credentials, state_dir: str | None = None,
                 path_map: list[tuple[str, str]] | None = None) -> None:
        # who this agent is on the wire (wire/pki.py): the server, the events and the copies
        # from other agents all use it; /host/credentials replaces it in place
        self.credentials = credentials
        self.state_dir = Path(state_dir) if state_dir else None
        # where guests' serial consoles are logged
        self.console_dir = str(self.state_dir / "console") if self.state_dir else None
        self.driver_factory = driver_factory
        self.storage = storage
        storage.tls = credentials.client_context()  # its copies from other agents
        self.multi_host = multi_host  # simulator: one driver per host uuid
        # (path the management node names, path on this machine), as a bind mount would map them:
        # several agents on one machine keep their "local" storage apart this way
        self.path_map = sorted(((norm_path(a), norm_path(b)) for a, b in path_map or []), key=lambda p: -len(p[0]))
        self._sim_stores: dict[str, LocalStorage] = {}
        # the only directories whose files this agent serves to other agents: primary storage
        # urls and backup storage urls the management node named here (kept across restarts)
        self.roots: set[str] = set()
        self.bs_roots: set[str] = set()
        self._load_roots()
        self.migrations: list[dict[str, Any]] = []  # simulator: the live migrations it recorded
        self.drivers: dict[str, HypervisorDriver] = {}
        self.backup = BackupStore()
        self.backup.tls = storage.tls  # it fetches images made from volumes from host agents
        self.management_url: str | None = None
        self._http = httpx.AsyncClient(timeout=10, verify=credentials.client_context())
        # events are posted as tasks of their own; with hundreds at once in httpx's pool, its
        # bookkeeping (every queued request against every connection, on each request) cost more
        # than all the agent's other work. A few at a time keep that queue short.
        self._event_slots = asyncio.Semaphore(8)
        self._pending_events: list[dict[str, Any]] = []
        # (host, vm) -> (state, until when): the state a command of the node's is bringing the VM
        # to. Its event is not posted: the node's flow sets that state itself, and an event per VM
        # start cost the node a request, a read and a transaction for nothing
        self._expected: dict[tuple[str, str], tuple[str, float]] = {}
        # host-side services (e.g. "flat": network namespaces, dnsmasq, metadata), closed with the agent
        self.extensions: dict[str, Any] = {}

    def install_credentials(self, bundle: bytes) -> None:
        current = self.credentials
        tmp = current.path.with_name(current.path.name + ".new")
        write_private(tmp, bundle)
        try:
            new = Credentials(tmp)
            if new.ca_pem != current.ca_pem or new.peer != current.peer:
                raise CredentialsError(f"they are for {new.peer}, not {current.peer} of the same CA")
        except CredentialsError:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, current.path)
        current.reload()
        log.info("new credentials installed, valid until %s", current.not_after)

    def _roots_file(self) -> Path | None:
        return self.state_dir / "roots.json" if self.state_dir and not self.storage.simulate else None

    def _load_roots(self) -> None:
        f = self._roots_file()
        if f is not None and f.exists():
            saved = json.loads(f.read_text())
            self.roots.update(saved.get("primary", []))
            self.bs_roots.update(saved.get("backup", []))

    def remember_root(self, path: str, backup: bool = False) -> None:
        """A storage url the management node named: its files may be served to other agents."""
        roots = self.bs_roots if backup else self.roots
        path = norm_path(path)
        if path in roots:
            return
        roots.add(path)
        f = self._roots_file()
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps({"primary": sorted(self.roots), "backup": sorted(self.bs_roots)}))

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

    def expect(self, host_uuid: str, vm_uuid: str, state: str | None) -> None:
        """A node's command is bringing the VM to ``state`` (None: it failed, expect nothing)."""
        if state is None:
            self._expected.pop((host_uuid, vm_uuid), None)
        else:
            self._expected[(host_uuid, vm_uuid)] = (state, time.monotonic() + EXPECT_SECONDS)

    async def report(self, host_uuid: str, vm_uuid: str, state: str) -> None:
        """Push a VM state change to the management node; keep it for retry if that fails."""
        expected = self._expected.pop((host_uuid, vm_uuid), None)
        if expected is not None and expected[0] == state and expected[1] > time.monotonic():
            return  # the change the node asked for: its own flow records it
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


def norm_path(path: str) -> str:
    return os.path.normpath(path) if path else path


def _remap(path: str, pairs: list[tuple[str, str]]) -> str:
    for src, dst in pairs:
        if src == "/":
            return dst.rstrip("/") + path
        if path == src or path.startswith(src + "/"):
            return dst + path[len(src):]
    return path


Command = Callable[[Agent, dict[str, Any]], Awaitable[dict[str, Any]]]
COMMANDS: dict[str, Command] = {}


# commands a /vm/start may carry, run before the domain starts (a plugin's part of the VM's start)
START_STEPS: set[str] = set()


def command(path: str, *, start_step: bool = False) -> Callable[[Command], Command]:
    """Register a command at ``path``; ``start_step``: a /vm/start may also carry it."""

    def register(fn: Command) -> Command:
        COMMANDS[path] = fn
        if start_step:
            START_STEPS.add(path)
        return fn

    return register


# Primary storages kept as files take the same commands under their plugin's prefix
# (/storage/local/* for LocalStorage, /storage/smp/* for SharedMountPoint: agent/plugins.py); the
# body's "path" is the storage's url, paths are absolute and inside it.
StorageCommand = Callable[[Agent, dict[str, Any], LocalStorage, bool], Awaitable[dict[str, Any]]]
STORAGE_COMMANDS: dict[str, StorageCommand] = {}
# command prefix -> shared (one file system every host has mounted) or a share of each host's own
STORAGE_KINDS: dict[str, bool] = {}


def storage_command(name: str) -> Callable[[StorageCommand], StorageCommand]:
    def register(fn: StorageCommand) -> StorageCommand:
        STORAGE_COMMANDS[name] = fn
        for prefix, shared in STORAGE_KINDS.items():
            _route(prefix, name, fn, shared)
        return fn

    return register


def add_storage_kind(prefix: str, shared: bool) -> None:
    """A primary storage type kept as files answers every storage command under ``prefix``."""
    STORAGE_KINDS[prefix] = shared
    for name, fn in STORAGE_COMMANDS.items():
        _route(prefix, name, fn, shared)


def remove_storage_kind(prefix: str) -> None:
    STORAGE_KINDS.pop(prefix, None)
    for name in STORAGE_COMMANDS:
        COMMANDS.pop(f"{prefix}/{name}", None)


def _route(prefix: str, name: str, fn: StorageCommand, shared: bool) -> None:
    async def run(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
        a.remember_root(b["path"])
        return await fn(a, b, a.store(b["hostUuid"], shared), shared)

    COMMANDS[f"{prefix}/{name}"] = run
