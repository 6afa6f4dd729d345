"""Helpers every resource family's handlers share: uuids, ownership, loading, tags, queries."""

from __future__ import annotations

import re
import uuid as uuidlib
from typing import Any, TypeVar

from sqlalchemy import Row, delete, select

from nimbostack.core import query
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import PERMISSION_DENIED, ApiError, invalid, not_found
from nimbostack.core.tags import validate_system_tag
from nimbostack.db.engine import Tx, get_row, insert_now
from nimbostack.db.models import AccountResourceRef, SystemTag, UserTag

T = TypeVar("T")
_UUID = re.compile(r"^[0-9a-f]{32}$")


def new_uuid(ctx: ApiContext | None = None) -> str:
    wanted = ctx.str("resourceUuid") if ctx is not None else None
    if wanted:
        if not _UUID.match(wanted):
            raise invalid(f"resourceUuid {wanted!r} must be 32 lower-case hex characters")
        return wanted
    return uuidlib.uuid4().hex


def check_uuid(name: str, value: str) -> str:
    if not _UUID.match(value):
        raise invalid(f"{name} {value!r} is not a uuid (32 lower-case hex characters)")
    return value


async def load(
    s: Tx,
    model: type[T],
    uuid: str | None,
    ctx: ApiContext,
    kind: str | None = None,
    owned: bool = False,
) -> T:
    """Fetch a row by uuid or fail with RESOURCE_NOT_FOUND; ``owned`` rows of other accounts are
    reported as not found, so one account cannot probe another's uuids."""
    label, uuid = _wanted(model, uuid, kind)
    row = await s.get(model, uuid)
    if row is None:
        raise not_found(label, uuid)
    await _check_owner(s, ctx, label, uuid, owned)
    return row


async def load_row(
    s: Tx, model: type, uuid: str | None, ctx: ApiContext, kind: str | None = None, owned: bool = False
) -> Row[Any]:
    """``load`` for a caller that only reads: the row's columns (db/engine.py ``get_row``)."""
    label, uuid = _wanted(model, uuid, kind)
    row = await get_row(s, model, uuid)
    if row is None:
        raise not_found(label, uuid)
    await _check_owner(s, ctx, label, uuid, owned)
    return row


def _wanted(model: type, uuid: str | None, kind: str | None) -> tuple[str, str]:
    """(what the resource is called in errors, its uuid): an error already if no uuid was given."""
    label = kind or model.__name__
    if not uuid:
        raise invalid(f"missing the uuid of the {label}")
    return label, uuid


async def _check_owner(s: Tx, ctx: ApiContext, label: str, uuid: str, owned: bool) -> None:
    if owned and not ctx.caller.is_admin:
        ref = (
            await s.execute(select(AccountResourceRef.accountUuid).where(AccountResourceRef.resourceUuid == uuid))
        ).scalar_one_or_none()
        if ref != ctx.caller.account_uuid:
            raise not_found(label, uuid)


def require_admin(ctx: ApiContext) -> None:
    if not ctx.caller.is_admin:
        raise ApiError(PERMISSION_DENIED, "Permission denied", f"only an admin account can call {ctx.msg.name}")


async def own(s: Tx, ctx: ApiContext, uuid: str, resource_type: str) -> None:
    await insert_now(
        s,
        AccountResourceRef(
            accountUuid=ctx.caller.account_uuid,
            ownerAccountUuid=ctx.caller.account_uuid,
            resourceUuid=uuid,
            resourceType=resource_type,
        ),
    )


async def disown(s: Tx, uuids: list[str]) -> None:
    await s.execute(delete(AccountResourceRef).where(AccountResourceRef.resourceUuid.in_(uuids)))
    await s.execute(delete(SystemTag).where(SystemTag.resourceUuid.in_(uuids)))
    await s.execute(delete(UserTag).where(UserTag.resourceUuid.in_(uuids)))


async def add_creation_tags(s: Tx, ctx: ApiContext, uuid: str, resource_type: str) -> None:
    """The ``systemTags`` / ``userTags`` every Create/Add message may carry."""
    for tag in ctx.list("systemTags"):
        validate_system_tag(resource_type, str(tag))
        await insert_now(s, SystemTag(uuid=new_uuid(), resourceUuid=uuid, resourceType=resource_type, tag=str(tag)))
    for tag in ctx.list("userTags"):
        if not str(tag).strip():
            raise invalid("a user tag must not be empty")
        await insert_now(s, UserTag(uuid=new_uuid(), resourceUuid=uuid, resourceType=resource_type, tag=str(tag)))


async def inv(s: Tx, object_name: str, row: Any) -> dict[str, Any]:
    return await query.inventory(s, object_name, row)


def register_queries(*names: str) -> None:
    """``Query<X>`` handlers are all the same: the query engine over the target registered for X."""
    for name in names:
        api(name)(_query)


async def _query(ctx: ApiContext) -> dict[str, Any]:
    return await query.run(ctx)


def state_event(event: str, events: dict[str, str]) -> str:
    """ZStack's ``stateEvent`` (enable/disable/...) → the new state."""
    new = events.get(event)
    if new is None:
        raise invalid(f"stateEvent must be one of {', '.join(events)}, got {event!r}")
    return new


ENABLE_DISABLE = {"enable": "Enabled", "disable": "Disabled"}


def update_fields(row: Any, ctx: ApiContext, names: tuple[str, ...] = ("name", "description")) -> None:
    for name in names:
        value = ctx.str(name)
        if value is not None:
            if name == "name" and not value.strip():
                raise invalid("name must not be empty")
            setattr(row, name, value)
