"""API deadlines, carried implicitly into every internal step and agent call the API causes."""

from __future__ import annotations

import contextvars
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)

DEFAULT_TIMEOUT = 1800.0  # seconds; like ZStack, half an hour unless configured
# Rollbacks run after the API's deadline may have passed; they get this long of their own.
ROLLBACK_GRACE = 60.0


def set_deadline(seconds: float) -> None:
    _deadline.set(time.monotonic() + seconds)


@contextmanager
def grace(seconds: float = ROLLBACK_GRACE) -> Iterator[None]:
    """A fresh deadline for clean-up work (rollbacks) in the current context, restored after."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining(default: float = DEFAULT_TIMEOUT) -> float:
    """Seconds left before the current API's deadline (``default`` outside any API)."""
    d = _deadline.get()
    if d is None:
        return default
    return max(0.001, d - time.monotonic())


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 30s, 10m, 6h)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


class ApiTimeouts:
    """Per-API timeouts. ``zstack.properties`` in the data dir may hold ZStack-style lines::

        ApiTimeout.org.zstack.header.image.APIAddImageMsg = <internal names>; 6h

    The internal message names are accepted for compatibility; the timeout applies to the whole
    API and everything it causes, which is what those names listed.

    The global config category ``apiTimeout`` (``UpdateGlobalConfig category=apiTimeout
    name=<API> value=30m``) overrides the file; the file overrides the built-in defaults.
    """

    DEFAULTS = {
        "AddImage": 3 * 3600.0,
        "LocalStorageMigrateVolume": 6 * 3600.0,
        "MigrateVm": 3600.0,
    }

    def __init__(self) -> None:
        self._timeouts: dict[str, float] = dict(self.DEFAULTS)
        # the apiTimeout global configs (full or short API name → seconds), read on every get
        self.overrides: Callable[[], dict[str, float]] = dict

    def load(self, path: Path) -> None:
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line.startswith("ApiTimeout.") or "=" not in line:
                continue
            key, value = line.split("=", 1)
            try:
                self.set(key.strip()[len("ApiTimeout.") :], value.split(";")[-1])
            except ValueError as err:
                log.warning("%s: ignoring %r: %s", path, line, err)

    def set(self, api: str, duration: str | float) -> None:
        seconds = duration if isinstance(duration, float | int) else parse_duration(duration)
        self._timeouts[_short(api)] = float(seconds)

    def get(self, api: str) -> float:
        short = _short(api)
        for name, seconds in self.overrides().items():
            if _short(name) == short:
                return float(seconds)
        return self._timeouts.get(short, DEFAULT_TIMEOUT)

    def file_default(self, api: str) -> float:
        """What the API's timeout is without a global config: zstack.properties or built in."""
        return self._timeouts.get(_short(api), DEFAULT_TIMEOUT)


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _short(api: str) -> str:
    name = api.rsplit(".", 1)[-1]
    if name.startswith("API") and name.endswith("Msg"):
        name = name[3:-3]
    return name
