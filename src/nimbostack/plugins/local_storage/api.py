"""The API that adds a LocalStorage primary storage."""

from __future__ import annotations

from typing import Any

from nimbostack.core.context import ApiContext, api
from nimbostack.plugins.local_storage.backend import LocalStorageBackend
from nimbostack.storage.primary import add_primary_storage


@api("AddLocalPrimaryStorage", admin=True)
async def add_local_ps(ctx: ApiContext) -> dict[str, Any]:
    return await add_primary_storage(ctx, LocalStorageBackend.type)
