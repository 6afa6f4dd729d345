"""Importing this module registers every API handler and query target: the core families', and
the built-in plugins' (nimbostack/plugins)."""

from nimbostack.api import identity, sharing, tags, users  # noqa: F401
from nimbostack.compute import (  # noqa: F401
    console,
    host,
    infra,
    migrate,
    vm,
    vm_config,
    vm_delete,
    vm_lifecycle,
    vm_nic,
)
from nimbostack.core import management  # noqa: F401
from nimbostack.network import eip, l2l3  # noqa: F401
from nimbostack.plugins import loader
from nimbostack.storage import backup, primary, snapshot, template, volume  # noqa: F401

loader.load_all()
