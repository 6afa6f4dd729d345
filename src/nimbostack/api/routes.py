"""Importing this module registers every API handler and query target."""

from nimbostack.api import identity, tags  # noqa: F401
from nimbostack.compute import host, infra, migrate, vm, vm_delete, vm_lifecycle  # noqa: F401
from nimbostack.network import eip, flat, l2l3  # noqa: F401
from nimbostack.storage import backup, local_migration, primary, snapshot, volume  # noqa: F401
