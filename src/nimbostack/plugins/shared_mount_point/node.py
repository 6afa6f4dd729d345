"""What the SharedMountPoint plugin gives the management node."""

from __future__ import annotations

from nimbostack.plugins.loader import Plugin
from nimbostack.plugins.shared_mount_point import api  # noqa: F401  (its @api handler)
from nimbostack.plugins.shared_mount_point.backend import SHARED_MOUNT_POINT

PLUGIN = Plugin(name="shared_mount_point", primary_storage=(SHARED_MOUNT_POINT,))
