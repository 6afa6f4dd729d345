"""The management node's plugin loader: finds each plugin folder's ``node.py``, registers what its
``PLUGIN = Plugin(...)`` declares, and takes all of it back on ``unload``."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path

from nimbostack.core import hooks, query
from nimbostack.core.context import ROUTES, Route
from nimbostack.network import providers
from nimbostack.storage import backend

FOLDER = Path(__file__).parent


@dataclass(frozen=True)
class Plugin:
    name: str
    # the plugin's API handlers and query targets are not listed: they are what its node.py's
    # imports register (@api, query.register), and load() records them as it imports it
    primary_storage: tuple[backend.PrimaryStorageBackend, ...] = ()
    network_providers: tuple[providers.ServiceProvider, ...] = ()
    vm_start: tuple[hooks.VmStartExtension, ...] = ()
    host_connect: tuple[hooks.HostHook, ...] = ()
    tag_change: tuple[hooks.TagHook, ...] = ()
    nic_change: tuple[hooks.NicHook, ...] = ()


@dataclass
class _Loaded:
    plugin: Plugin
    routes: dict[str, Route] = field(default_factory=dict)
    targets: dict[str, query.QueryTarget] = field(default_factory=dict)


LOADED: dict[str, _Loaded] = {}
# what each plugin's modules registered when first imported: a plugin unloaded and loaded again is
# not imported again, so its handlers are put back from here
_FIRST: dict[str, _Loaded] = {}


def load(name: str) -> Plugin:
    """Import ``nimbostack.plugins.<name>.node`` and register what its PLUGIN declares; loading a
    loaded plugin again does nothing."""
    if name in LOADED:
        return LOADED[name].plugin
    first = _FIRST.get(name)
    if first is None:
        routes_before, targets_before = set(ROUTES), set(query.TARGETS)
        plugin: Plugin = importlib.import_module(f"nimbostack.plugins.{name}.node").PLUGIN
        first = _FIRST[name] = _Loaded(
            plugin,
            {k: v for k, v in ROUTES.items() if k not in routes_before},
            {k: v for k, v in query.TARGETS.items() if k not in targets_before},
        )
    plugin = first.plugin
    ROUTES.update(first.routes)
    query.TARGETS.update(first.targets)
    for b in plugin.primary_storage:
        backend.register(b)
    for provider in plugin.network_providers:
        providers.register(provider)
    for ext in plugin.vm_start:
        hooks.on_vm_start(ext)
    for hook in plugin.host_connect:
        hooks.on_host_connect(hook)
    for tag_hook in plugin.tag_change:
        hooks.on_tag_change(tag_hook)
    for nic_hook in plugin.nic_change:
        hooks.on_nic_change(nic_hook)
    LOADED[name] = first
    return plugin


def unload(name: str) -> None:
    """Take back everything ``load`` registered (its API handlers answer "no such API" again)."""
    loaded = LOADED.pop(name, None)
    if loaded is None:
        return
    plugin = loaded.plugin
    for nic_hook in plugin.nic_change:
        hooks.off_nic_change(nic_hook)
    for tag_hook in plugin.tag_change:
        hooks.off_tag_change(tag_hook)
    for hook in plugin.host_connect:
        hooks.off_host_connect(hook)
    for ext in plugin.vm_start:
        hooks.off_vm_start(ext)
    for provider in plugin.network_providers:
        providers.unregister(provider.type)
    for b in plugin.primary_storage:
        backend.unregister(b.type)
    for route in loaded.routes:
        ROUTES.pop(route, None)
    for target in loaded.targets:
        query.TARGETS.pop(target, None)


def found() -> list[str]:
    """The plugin folders that have a management node part, by name."""
    folders = [info.name for info in pkgutil.iter_modules([str(FOLDER)]) if info.ispkg]
    return sorted(name for name in folders if (FOLDER / name / "node.py").exists())


def load_all() -> None:
    for name in found():
        load(name)
