"""Global configuration: typed, validated values with defaults, stored in the database."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from nimbostack.core import deadline, spec
from nimbostack.core.errors import ApiError, invalid
from nimbostack.db.engine import Database
from nimbostack.db.models import GlobalConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConfigDef:
    category: str
    name: str
    default: str
    description: str
    kind: str = "str"  # str | int | bool | duration (30s, 10m, 6h → seconds)
    choices: tuple[str, ...] | None = None
    min: int | None = None

    def parse(self, raw: Any) -> Any:
        text = str(raw).strip()
        if self.choices is not None:
            if text not in self.choices:
                raise invalid(f"{self.category}/{self.name}: '{text}' is not one of {', '.join(self.choices)}")
            return text
        if self.kind == "int":
            try:
                value = int(text)
            except ValueError:
                raise invalid(f"{self.category}/{self.name}: '{text}' is not an integer") from None
            if self.min is not None and value < self.min:
                raise invalid(f"{self.category}/{self.name}: {value} is less than the minimum {self.min}")
            return value
        if self.kind == "duration":
            try:
                seconds = deadline.parse_duration(text)
            except ValueError:
                raise invalid(f"{self.category}/{self.name}: '{text}' is not a duration like 30s, 10m or 6h") from None
            if seconds <= 0:
                raise invalid(f"{self.category}/{self.name}: a timeout must be longer than 0")
            return seconds
        if self.kind == "bool":
            if text.lower() not in ("true", "false"):
                raise invalid(f"{self.category}/{self.name}: '{text}' is not true or false")
            return text.lower() == "true"
        return text


def _deletion(category: str, what: str) -> list[ConfigDef]:
    return [
        ConfigDef(
            category,
            "deletionPolicy",
            "Delay",
            f"How a deleted {what} is removed: Direct (at once), Delay (after expungePeriod), "
            "Never (kept, recoverable)",
            choices=("Direct", "Delay", "Never"),
        ),
        ConfigDef(
            category,
            "expungePeriod",
            "86400",
            f"Seconds a Delay-deleted {what} is kept before it is expunged",
            "int",
            min=1,
        ),
        ConfigDef(
            category, "expungeInterval", "3600", f"Seconds between two scans for {what}s to expunge", "int", min=1
        ),
    ]


DEFINITIONS: list[ConfigDef] = [
    *_deletion("vm", "VM"),
    *_deletion("image", "image"),
    *_deletion("volume", "data volume"),
    ConfigDef(
        "vm", "dataVolume.deleteOnVmDestroy", "false", "Delete a VM's data volumes when the VM is destroyed", "bool"
    ),
    ConfigDef(
        "kvm", "vm.consoleMode", "vnc", "Graphics console of VMs started after the change", choices=("vnc", "spice")
    ),
    ConfigDef(
        "kvm",
        "vm.cpuMode",
        "none",
        "CPU model of VMs started after the change",
        choices=("none", "host-model", "host-passthrough"),
    ),
    ConfigDef(
        "kvm",
        "vm.cacheMode",
        "none",
        "Disk cache mode of VMs started after the change",
        choices=("none", "writethrough", "writeback"),
    ),
    ConfigDef("kvm", "reservedMemory", "536870912", "Bytes of a KVM host's memory kept for the host", "int", min=0),
    ConfigDef("host", "ping.interval", "10", "Seconds between two pings of a connected host", "int", min=1),
    ConfigDef("host", "ping.timeout", "5", "Seconds a ping may take before the host is Disconnected", "int", min=1),
    ConfigDef(
        "host",
        "connection.autoReconnectOnError",
        "true",
        "Reconnect a Disconnected host when its agent answers again",
        "bool",
    ),
    ConfigDef("identity", "session.timeout", "7200", "Seconds a session lives after login", "int", min=60),
    ConfigDef("identity", "session.maxConcurrent", "500", "Sessions one account may hold at once", "int", min=1),
    ConfigDef(
        "identity", "login.maxFailures", "5", "Wrong passwords in a row before an account's logins pause", "int", min=1
    ),
    ConfigDef(
        "identity", "login.lockSeconds", "60", "Seconds an account's logins pause after too many failures", "int",
        min=1,
    ),
    ConfigDef(
        "identity",
        "login.maxFailuresPerAddress",
        "30",
        "Wrong passwords from one client address, whatever the accounts, before its logins pause "
        "(identity/login.lockSeconds after the last)",
        "int",
        min=1,
    ),
    ConfigDef(
        "image",
        "localDirs",
        "/",
        "Comma-separated directories an admin's AddImage may name local files in (empty: none); "
        "tenants may never name local files",
    ),
    ConfigDef("gc", "interval", "60", "Seconds between two runs of the garbage collector's poll", "int", min=1),
    # ZStack 1.2's "Database Periodical Backup" (release notes: the title only): daily, the last 7 kept
    ConfigDef(
        "database",
        "backup.interval",
        "86400",
        "Seconds between two periodic backups of the database, taken by the management node into "
        "DATA_DIR/db-backups (0: none)",
        "int",
        min=0,
    ),
    ConfigDef(
        "database", "backup.retention", "7", "Periodic database backups kept; older ones are removed", "int", min=1
    ),
    ConfigDef(
        "console",
        "token.timeout",
        "60",
        "Seconds a console URL from RequestConsoleAccess can be opened (once) before it expires",
        "int",
        min=1,
    ),
]

_BY_KEY = {(d.category, d.name): d for d in DEFINITIONS}

# Per-API timeouts (release 1.2 §3): one config per API that has been given a timeout, named by
# the API's full message name; created by UpdateGlobalConfig, removed by resetting it (no value).
API_TIMEOUT = "apiTimeout"


def api_timeout_definition(name: str) -> ConfigDef:
    """``CreateVmInstance``, ``APICreateVmInstanceMsg`` or ``org.zstack.header.vm.APICreateVmInstanceMsg``."""
    short = name.strip().rsplit(".", 1)[-1]
    if short.startswith("API") and short.endswith("Msg"):
        short = short[3:-3]
    msg = spec.messages().get(short)
    if msg is None or ("." in name and spec.by_full_name().get(name.strip()) is None):
        raise invalid(f"apiTimeout: {name!r} is not an API of the API table (e.g. CreateVmInstance or "
                      "org.zstack.header.vm.APICreateVmInstanceMsg)")
    default = deadline.ApiTimeouts.DEFAULTS.get(msg.name, deadline.DEFAULT_TIMEOUT)
    return ConfigDef(
        API_TIMEOUT,
        msg.full_name,
        deadline.format_duration(default),
        f"Timeout of {msg.name} and every step and agent call it causes",
        "duration",
    )


def definition(category: str, name: str) -> ConfigDef:
    if category == API_TIMEOUT:
        return api_timeout_definition(name)
    d = _BY_KEY.get((category, name))
    if d is None:
        raise invalid(f"no global config {category}/{name}")
    return d


class GlobalConfigStore:
    """Values cached in memory and re-read every few seconds by ``refresh_loop``, so management
    nodes that share the database converge without a broker. Reading a value never touches the
    database: callers read configs inside their own transactions, and with SQLite's single
    connection a read that opened a second transaction would wait for itself."""

    REFRESH_SECONDS = 5.0

    def __init__(self, db: Database) -> None:
        self.db = db
        self._values: dict[tuple[str, str], Any] = {}
        self._listeners: list[Callable[[str, str, Any], None]] = []

    async def seed(self) -> None:
        async with self.db.tx() as s:
            existing = {(r.category, r.name) for r in (await s.execute(select(GlobalConfig))).scalars()}
            for d in DEFINITIONS:
                if (d.category, d.name) not in existing:
                    s.add(
                        GlobalConfig(
                            category=d.category,
                            name=d.name,
                            description=d.description,
                            defaultValue=d.default,
                            value=d.default,
                        )
                    )
        await self.refresh()

    async def refresh(self) -> None:
        async with self.db.tx() as s:
            rows = (await s.execute(select(GlobalConfig))).scalars().all()
        values = {}
        for r in rows:
            d = _BY_KEY.get((r.category, r.name))
            if d is None and r.category == API_TIMEOUT:
                try:
                    d = api_timeout_definition(r.name)
                except ApiError:
                    continue
            if d is not None:
                values[(r.category, r.name)] = d.parse(r.value)
        self._values = values

    async def get(self, category: str, name: str) -> Any:
        return self._values[(category, name)]

    async def refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.REFRESH_SECONDS)
            try:
                await self.refresh()
            except Exception:  # a database hiccup must not stop later refreshes
                log.exception("refreshing global configs failed")

    def cached(self, category: str, name: str) -> Any:
        return self._values[(category, name)]

    def category_values(self, category: str) -> dict[str, Any]:
        """Every cached value of a category, by name (e.g. the apiTimeout configs that are set)."""
        return {n: v for (c, n), v in self._values.items() if c == category}

    async def update(self, category: str, name: str, raw: Any) -> GlobalConfig:
        """Set a config; ``raw`` None resets it to its default (an apiTimeout config is removed)."""
        d = definition(category, name)
        name = d.name
        if raw is None and category == API_TIMEOUT:
            async with self.db.tx() as s:
                row = (
                    await s.execute(
                        select(GlobalConfig).where(GlobalConfig.category == category, GlobalConfig.name == name)
                    )
                ).scalar_one_or_none()
                if row is not None:
                    await s.delete(row)
            self._values.pop((category, name), None)
            return GlobalConfig(category=category, name=name, description=d.description, defaultValue=d.default,
                                value=d.default)
        if raw is None:
            raw = d.default
        value = d.parse(raw)
        async with self.db.tx() as s:
            row = (
                await s.execute(
                    select(GlobalConfig).where(GlobalConfig.category == category, GlobalConfig.name == name)
                )
            ).scalar_one_or_none()
            if row is None:  # an apiTimeout config is created when first set
                row = GlobalConfig(category=category, name=name, description=d.description, defaultValue=d.default)
                s.add(row)
            row.value = str(raw).strip() if d.kind != "bool" else str(value).lower()
        self._values[(category, name)] = value
        for listener in self._listeners:
            listener(category, name, value)
        return row

    def on_change(self, listener: Callable[[str, str, Any], None]) -> None:
        self._listeners.append(listener)
