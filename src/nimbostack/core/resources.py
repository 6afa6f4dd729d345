"""Helpers every resource family's handlers share: uuids, ownership, loading, tags, queries."""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sqlalchemy import ColumnElement, Row, delete, func, insert, select

from nimbostack.core import query, spec
from nimbostack.core.auth import ADMIN_UUID, Caller
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import PERMISSION_DENIED, ApiError, invalid, not_allowed, not_found
from nimbostack.core.tags import validate_system_tag
from nimbostack.db.engine import Tx, get_row, insert_now, table_of
from nimbostack.db.models import AccountResourceRef, SystemTag, UserTag

T = TypeVar("T")
_UUID = re.compile(r"^[0-9a-f]{32}$")


class Acting(Protocol):
    """On whose behalf: an API call's context, or a service request that carries its caller."""

    @property
    def caller(self) -> Caller: ...


def new_uuid(ctx: ApiContext | None = None) -> str:
    if ctx is not None and ctx.resource_uuid:
        return ctx.resource_uuid
    return wanted_uuid(ctx.str("resourceUuid") if ctx is not None else None)


def wanted_uuid(wanted: str | None) -> str:
    """The ``resourceUuid`` a creator asked for, checked, or a new one."""
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
    ctx: Acting,
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
    s: Tx, model: type, uuid: str | None, ctx: Acting, kind: str | None = None, owned: bool = False
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


async def _check_owner(s: Tx, ctx: Acting, label: str, uuid: str, owned: bool) -> None:
    if owned and not ctx.caller.is_admin:
        ref = (
            await s.execute(select(AccountResourceRef.accountUuid).where(AccountResourceRef.resourceUuid == uuid))
        ).scalar_one_or_none()
        if ref != ctx.caller.account_uuid:
            raise not_found(label, uuid)


def visible_clause(caller: Caller, column: Any, owned: bool = False) -> list[ColumnElement[bool]]:
    """The WHERE of the resources a caller may be offered (Get...Attachable...): an admin's are
    every account's; a normal account's are its own and, unless ``owned``, the admin's (shared by
    design, as ``check_visible`` lets it name them)."""
    if caller.is_admin:
        return []
    if owned:
        mine = select(AccountResourceRef.resourceUuid).where(AccountResourceRef.accountUuid == caller.account_uuid)
        return [column.in_(mine)]
    foreign = select(AccountResourceRef.resourceUuid).where(
        AccountResourceRef.accountUuid.not_in([caller.account_uuid, ADMIN_UUID]),
        AccountResourceRef.resourceUuid.not_in(query.shared_with(caller.account_uuid)),
    )
    return [column.not_in(foreign)]


def require_admin(ctx: ApiContext) -> None:
    if not ctx.caller.is_admin:
        raise ApiError(PERMISSION_DENIED, "Permission denied", f"only an admin account can call {ctx.msg.name}")


async def own(s: Tx, ctx: Acting, uuid: str, resource_type: str) -> None:
    await insert_now(
        s,
        AccountResourceRef(
            accountUuid=ctx.caller.account_uuid,
            ownerAccountUuid=ctx.caller.account_uuid,
            resourceUuid=uuid,
            resourceType=resource_type,
        ),
    )


_OWN = insert(table_of(AccountResourceRef))  # Core: one executemany on either database


async def own_all(s: Tx, ctx: Acting, resources: Sequence[tuple[str, str]]) -> None:
    """``own`` of several resources one call made (a VM and its volumes), in one statement."""
    account = ctx.caller.account_uuid
    rows = [
        {"accountUuid": account, "ownerAccountUuid": account, "resourceUuid": u, "resourceType": t}
        for u, t in resources
    ]
    if rows:
        await s.execute(_OWN, rows)


async def disown(s: Tx, uuids: list[str]) -> None:
    await s.execute(delete(AccountResourceRef).where(AccountResourceRef.resourceUuid.in_(uuids)))
    await s.execute(delete(SystemTag).where(SystemTag.resourceUuid.in_(uuids)))
    await s.execute(delete(UserTag).where(UserTag.resourceUuid.in_(uuids)))


async def add_creation_tags(s: Tx, ctx: ApiContext, uuid: str, resource_type: str) -> None:
    """The ``systemTags`` / ``userTags`` every Create/Add message may carry."""
    await add_tags(s, uuid, resource_type, [str(t) for t in ctx.list("systemTags")], ctx.list("userTags"))


async def add_tags(
    s: Tx, uuid: str, resource_type: str, system: list[str], user: list[Any]
) -> None:
    for tag in system:
        validate_system_tag(resource_type, tag)
        await insert_now(s, SystemTag(uuid=new_uuid(), resourceUuid=uuid, resourceType=resource_type, tag=tag))
    for tag in user:
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


async def change_state(ctx: ApiContext, model: type, kind: str, object_name: str) -> dict[str, Any]:
    """A Change...State message of an owned resource: its ``stateEvent`` (enable, disable) applied,
    and the resource's inventory."""
    async with ctx.p.db.tx() as s:
        row = await load(s, model, ctx.req("uuid"), ctx, kind, owned=True)
        row.state = state_event(ctx.req("stateEvent"), ENABLE_DISABLE)
        await s.flush()
        return {"inventory": await inv(s, object_name, row)}


def update_fields(row: Any, ctx: ApiContext, names: tuple[str, ...] = ("name", "description")) -> None:
    for name in names:
        value = ctx.str(name)
        if value is not None:
            if name == "name" and not value.strip():
                raise invalid("name must not be empty")
            setattr(row, name, value)


# fields named like references that name no existing resource of someone else: the uuid a new
# resource asks for (except for tags, whose resourceUuid is the tagged resource), a session's token,
# the accounts a resource is shared with (ShareResource: another account is whom one shares with)
_NOT_REFERENCES = {"sessionUuid", "creatingAccountUuid", "accountUuids"}


def referenced_uuids(msg: spec.MessageSpec, params: dict[str, Any]) -> dict[str, str]:
    """Every uuid the call names (``uuid``, ``...Uuid``, ``...Uuids``), with the field naming it."""
    out: dict[str, str] = {}
    for name, value in params.items():
        if name in _NOT_REFERENCES or (name == "resourceUuid" and "Tag" not in msg.name):
            continue
        if name == "uuid" or name.endswith("Uuid"):
            values = [value]
        elif name.endswith("Uuids"):
            values = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else []
        else:
            continue
        for v in values:
            if isinstance(v, str) and v.strip():
                out.setdefault(v.strip(), name)
    return out


async def check_visible(s: Tx, msg: spec.MessageSpec, params: dict[str, Any], caller: Caller) -> None:
    """A normal account names only its own resources, the admin's, which are shared by design
    (images, offerings, public L3 networks: what every account builds its VMs from), and those
    shared with it (ShareResource); another normal account's look like no resource at all,
    whatever the API and its handler. Whether it
    may change an admin's resource is the handler's to say (``load(..., owned=True)``)."""
    if caller.is_admin:
        return
    uuids = referenced_uuids(msg, params)
    if not uuids:
        return
    foreign = (
        await s.execute(
            select(AccountResourceRef.resourceUuid).where(
                AccountResourceRef.resourceUuid.in_(list(uuids)),
                AccountResourceRef.accountUuid.not_in([caller.account_uuid, ADMIN_UUID]),
                AccountResourceRef.resourceUuid.not_in(query.shared_with(caller.account_uuid)),
            )
        )
    ).scalars().first()
    if foreign is not None:
        raise not_found(uuids[foreign], foreign)


# --- Get...Capacity: one scope, and sums over it


@dataclass(frozen=True)
class Scope:
    """One uuid-list field of a Get...Capacity message: what its uuids name (``owned``: a normal
    account names only its own), and which of the counted rows they select."""

    model: type
    kind: str
    rows: Callable[[list[str]], ColumnElement[bool]]
    owned: bool = False


async def capacity_scope(s: Tx, ctx: ApiContext, scopes: dict[str, Scope]) -> list[ColumnElement[bool]]:
    """The WHERE of the rows a Get...Capacity message counts: exactly one of its uuid lists, each
    uuid loaded like any other reference (unknown or another account's: not found), or
    ``all=true`` (every account's resources: admin only; no WHERE)."""
    lists = {name: [str(u).strip() for u in ctx.list(name)] for name in scopes}
    given = [name for name, uuids in lists.items() if uuids] + (["all"] if ctx.bool("all") else [])
    if len(given) != 1:
        raise invalid(f"{ctx.msg.name} needs exactly one of {', '.join(scopes)} or all=true")
    name = given[0]
    if name == "all":
        if not ctx.caller.is_admin:
            raise not_allowed("all=true counts every account's resources: admin only")
        return []
    scope = scopes[name]
    for uuid in lists[name]:
        await load(s, scope.model, uuid, ctx, scope.kind, owned=scope.owned)
    return [scope.rows(lists[name])]


async def capacity_sums(
    ctx: ApiContext, scopes: dict[str, Scope], columns: Sequence[Any], *where: ColumnElement[bool]
) -> list[int]:
    """SUM of each column over the rows of the scope the message asks for (and ``where``); 0 over none."""
    async with ctx.p.db.tx() as s:
        clauses = [*await capacity_scope(s, ctx, scopes), *where]
        sums = select(*(func.coalesce(func.sum(c), 0) for c in columns)).where(*clauses)
        return [int(v) for v in (await s.execute(sums)).one()]
