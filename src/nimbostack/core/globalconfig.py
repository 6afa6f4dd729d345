"""Global configuration: typed, validated values with defaults, stored in the database."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from nimbostack.core.errors import invalid
from nimbostack.db.engine import Database
from nimbostack.db.models import GlobalConfig


@dataclass(frozen=True)
class ConfigDef:
    category: str
    name: str
    default: str
    description: str
    kind: str = "str"  # str | int | bool
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
    ConfigDef("gc", "interval", "60", "Seconds between two runs of the garbage collector's poll", "int", min=1),
]

_BY_KEY = {(d.category, d.name): d for d in DEFINITIONS}


def definition(category: str, name: str) -> ConfigDef:
    d = _BY_KEY.get((category, name))
    if d is None:
        raise invalid(f"no global config {category}/{name}")
    return d


class GlobalConfigStore:
    """Values cached in memory and re-read every few seconds, so management nodes that share the
    database converge without a broker and the hot path never queries for a config."""

    REFRESH_SECONDS = 5.0

    def __init__(self, db: Database) -> None:
        self.db = db
        self._values: dict[tuple[str, str], Any] = {}
        self._loaded_at = 0.0
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
            if d is not None:
                values[(r.category, r.name)] = d.parse(r.value)
        self._values = values
        self._loaded_at = time.monotonic()

    async def get(self, category: str, name: str) -> Any:
        if time.monotonic() - self._loaded_at > self.REFRESH_SECONDS:
            await self.refresh()
        return self._values[(category, name)]

    def cached(self, category: str, name: str) -> Any:
        return self._values[(category, name)]

    async def update(self, category: str, name: str, raw: Any) -> GlobalConfig:
        d = definition(category, name)
        value = d.parse(raw)
        async with self.db.tx() as s:
            row = (
                await s.execute(
                    select(GlobalConfig).where(GlobalConfig.category == category, GlobalConfig.name == name)
                )
            ).scalar_one()
            row.value = str(raw).strip() if d.kind != "bool" else str(value).lower()
        self._values[(category, name)] = value
        for listener in self._listeners:
            listener(category, name, value)
        return row

    def on_change(self, listener: Callable[[str, str, Any], None]) -> None:
        self._listeners.append(listener)
