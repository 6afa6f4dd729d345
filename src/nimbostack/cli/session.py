"""Where the shell keeps its state: ``~/.nimbostack`` (or ``$NIMBOSTACK_CLI_HOME``).

``cli-session.json`` maps ``host:port`` to the session of that management node::

    {"127.0.0.1:8080": {"uuid": "3f2c...", "accountName": "admin"}}

The file is written atomically with mode 0600; the directory is created 0700.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

HOME_ENV = "NIMBOSTACK_CLI_HOME"
SESSION_FILE = "cli-session.json"
HISTORY_FILE = "cli-history"


def cli_home() -> Path:
    override = os.environ.get(HOME_ENV)
    return Path(override).expanduser() if override else Path.home() / ".nimbostack"


def ensure_home(home: Path) -> Path:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return home


class SessionStore:
    """Session uuids per management node (``host:port``)."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = home if home is not None else cli_home()
        self.path = self.home / SESSION_FILE

    @staticmethod
    def key(host: str, port: int) -> str:
        return f"{host}:{port}"

    def _load(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # unreadable or corrupt: behave as logged out; the next login rewrites it
        return data if isinstance(data, dict) else {}

    def _save(self, data: dict[str, Any]) -> None:
        ensure_home(self.home)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.write("\n")
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def get(self, host: str, port: int) -> str | None:
        entry = self._load().get(self.key(host, port))
        if isinstance(entry, dict) and isinstance(entry.get("uuid"), str):
            return entry["uuid"]
        return None

    def info(self, host: str, port: int) -> dict[str, Any]:
        entry = self._load().get(self.key(host, port))
        return dict(entry) if isinstance(entry, dict) else {}

    def set(self, host: str, port: int, uuid: str, **info: str) -> None:
        data = self._load()
        data[self.key(host, port)] = {"uuid": uuid, **{k: v for k, v in info.items() if v}}
        self._save(data)

    def clear(self, host: str, port: int) -> None:
        data = self._load()
        if data.pop(self.key(host, port), None) is not None:
            self._save(data)
