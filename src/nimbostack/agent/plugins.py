"""The host agent's plugin loader: finds each plugin folder's ``agent.py``, registers what its
``AGENT = AgentPlugin(...)`` declares, and takes it back on ``unload``."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import nimbostack
from nimbostack.agent.host import COMMANDS, Command, add_storage_kind, remove_storage_kind

FOLDER = Path(nimbostack.__file__).parent / "plugins"


@dataclass(frozen=True)
class AgentPlugin:
    name: str
    # modules whose @command handlers register when they are imported
    commands: tuple[ModuleType, ...] = ()
    # primary storage kept as files: command prefix -> shared (one file system every host mounts)
    storage_kinds: dict[str, bool] = field(default_factory=dict)


@dataclass
class _Loaded:
    plugin: AgentPlugin
    commands: dict[str, Command]


LOADED: dict[str, _Loaded] = {}
_FIRST: dict[str, _Loaded] = {}  # as plugins/loader.py: a module is imported, and registers, once


def load(name: str) -> AgentPlugin:
    if name in LOADED:
        return LOADED[name].plugin
    first = _FIRST.get(name)
    if first is None:
        before = set(COMMANDS)
        plugin: AgentPlugin = importlib.import_module(f"nimbostack.plugins.{name}.agent").AGENT
        first = _FIRST[name] = _Loaded(plugin, {k: v for k, v in COMMANDS.items() if k not in before})
    COMMANDS.update(first.commands)
    for prefix, shared in first.plugin.storage_kinds.items():
        add_storage_kind(prefix, shared)
    LOADED[name] = first
    return first.plugin


def unload(name: str) -> None:
    loaded = LOADED.pop(name, None)
    if loaded is None:
        return
    for prefix in loaded.plugin.storage_kinds:
        remove_storage_kind(prefix)
    for path in loaded.commands:
        COMMANDS.pop(path, None)


def found() -> list[str]:
    """The plugin folders that have a host agent part, by name."""
    folders = [info.name for info in pkgutil.iter_modules([str(FOLDER)]) if info.ispkg]
    return sorted(name for name in folders if (FOLDER / name / "agent.py").exists())


def load_all() -> None:
    for name in found():
        load(name)
