"""The API that adds a SharedMountPoint primary storage."""

from __future__ import annotations

from typing import Any

from nimbostack.core.context import ApiContext, api
from nimbostack.plugins.shared_mount_point.backend import SharedMountPointBackend
from nimbostack.storage.primary import add_primary_storage


@api("AddSharedMountPointPrimaryStorage", admin=True)
async def add_smp_ps(ctx: ApiContext) -> dict[str, Any]:
    """Release 1.2: a directory every host of the attached clusters has mounted (NFS, GlusterFS,
    OCFS2 ...); checked on each host when the storage is attached to its cluster."""
    return await add_primary_storage(ctx, SharedMountPointBackend.type)
