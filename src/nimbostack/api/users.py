"""Users, user groups and policies of an account (ZStack 1.2's identity family). A user logs in with
LogInByUser and acts for its account, within what its policies allow (core/policy.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select

from nimbostack.api.identity import password_digest, session_inventory
from nimbostack.core import policy, query, spec
from nimbostack.core.auth import hash_password
from nimbostack.core.context import ROUTES, ApiContext, api
from nimbostack.core.errors import invalid
from nimbostack.core.resources import add_creation_tags, disown, inv, load, new_uuid, own, register_queries
from nimbostack.db import models as m
from nimbostack.db.engine import Tx

_ACCOUNT = query.Join("accountUuid", "QueryObjectAccountInventory", "uuid")


async def _policy_extra(s: Tx, rows: Any, invs: list[dict[str, Any]]) -> None:
    for row, out in zip(rows, invs, strict=True):
        out["statements"] = [st.inventory() for st in policy.load_statements(row.statements)]


query.register(
    query.QueryTarget("QueryObjectUserInventory", m.User, "UserInventory", joins={"account": _ACCOUNT})
)
query.register(
    query.QueryTarget("QueryObjectUserGroupInventory", m.UserGroup, "UserGroupInventory", joins={"account": _ACCOUNT})
)
query.register(
    query.QueryTarget(
        "QueryObjectPolicyInventory", m.Policy, "PolicyInventory", joins={"account": _ACCOUNT}, extra=_policy_extra
    )
)
register_queries("QueryUser", "QueryUserGroup", "QueryPolicy")


# --- login -----------------------------------------------------------------------------------


@api("LogInByUser", public=True)
async def login_by_user(ctx: ApiContext) -> dict[str, Any]:
    account_uuid, account_name = ctx.str("accountUuid"), ctx.str("accountName")
    if not account_uuid and not account_name:
        raise invalid("LogInByUser needs the user's account: accountName or accountUuid")
    token, session = await ctx.p.auth.login_user(
        account_name, account_uuid, ctx.req("userName"), password_digest(ctx), ctx.source
    )
    return {"inventory": session_inventory(token, session)}


# --- users and user groups -------------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    """One kind of an account's identity resources, and the rows naming one that go with it."""

    model: type
    label: str  # in errors
    resource_type: str  # AccountResourceRef.resourceType
    object_name: str  # its query object
    refs: tuple[Any, ...]  # columns of other tables that name one


USER = _Kind(
    m.User, "User", "UserVO", "QueryObjectUserInventory",
    (m.Session.userUuid, m.UserGroupUserRef.userUuid, m.UserPolicyRef.userUuid),
)
GROUP = _Kind(
    m.UserGroup, "UserGroup", "UserGroupVO", "QueryObjectUserGroupInventory",
    (m.UserGroupUserRef.groupUuid, m.UserGroupPolicyRef.groupUuid),
)
POLICY = _Kind(
    m.Policy, "Policy", "PolicyVO", "QueryObjectPolicyInventory",
    (m.UserPolicyRef.policyUuid, m.UserGroupPolicyRef.policyUuid),
)


def _name(ctx: ApiContext, required: bool = True) -> str | None:
    name = ctx.req("name") if required else ctx.str("name")
    if name is not None and not name.strip():
        raise invalid("name must not be empty")
    return name.strip() if name is not None else None


async def _create(ctx: ApiContext, kind: _Kind, **fields: Any) -> dict[str, Any]:
    """A new one of the caller's account, with the message's name, description and tags."""
    name = _name(ctx)
    async with ctx.p.db.tx() as s:
        if kind is USER:
            await _unique_user_name(s, ctx.caller.account_uuid, str(name))
        row = kind.model(
            uuid=new_uuid(ctx), accountUuid=ctx.caller.account_uuid, name=name, description=ctx.str("description"),
            **fields,
        )
        s.add(row)
        await own(s, ctx, row.uuid, kind.resource_type)
        await add_creation_tags(s, ctx, row.uuid, kind.resource_type)
        await s.flush()
        return {"inventory": await inv(s, kind.object_name, row)}


async def _update(ctx: ApiContext, kind: _Kind, uuid: str, **fields: Any) -> dict[str, Any]:
    """The message's name and description (and ``fields``) set on one of the account's."""
    async with ctx.p.db.tx() as s:
        row = await load(s, kind.model, uuid, ctx, kind.label, owned=True)
        name = _name(ctx, required=False)
        if name is not None:
            if kind is USER:
                await _unique_user_name(s, row.accountUuid, name, row.uuid)
            row.name = name
        if ctx.str("description") is not None:
            row.description = ctx.str("description")
        for key, value in fields.items():
            setattr(row, key, value)
        await s.flush()
        return {"inventory": await inv(s, kind.object_name, row)}


async def _delete(ctx: ApiContext, kind: _Kind) -> str:
    """One of the account's, with what names it (a user's sessions, attachments, tags)."""
    async with ctx.p.db.tx() as s:
        row = await load(s, kind.model, ctx.req("uuid"), ctx, kind.label, owned=True)
        for column in kind.refs:
            await s.execute(delete(column.class_).where(column == row.uuid))
        await disown(s, [row.uuid])
        await s.delete(row)
        return str(row.uuid)


async def _unique_user_name(s: Tx, account_uuid: str, name: str, uuid: str | None = None) -> None:
    taken = (
        await s.execute(select(m.User.uuid).where(m.User.accountUuid == account_uuid, m.User.name == name))
    ).scalar_one_or_none()
    if taken is not None and taken != uuid:
        raise invalid(f"the account already has a user named {name}")


@api("CreateUser")
async def create_user(ctx: ApiContext) -> dict[str, Any]:
    return await _create(ctx, USER, passwordHash=await hash_password(password_digest(ctx)))


@api("UpdateUser")
async def update_user(ctx: ApiContext) -> dict[str, Any]:
    uuid = ctx.str("uuid") or ctx.caller.user_uuid
    if not uuid:
        raise invalid("uuid: which user to update (an account's session has no user of its own)")
    password = {"passwordHash": await hash_password(password_digest(ctx))} if ctx.str("password") else {}
    return await _update(ctx, USER, uuid, **password)


@api("DeleteUser")
async def delete_user(ctx: ApiContext) -> dict[str, Any]:
    ctx.p.auth.forget_users([await _delete(ctx, USER)])
    return {}


@api("CreateUserGroup")
async def create_user_group(ctx: ApiContext) -> dict[str, Any]:
    return await _create(ctx, GROUP)


@api("UpdateUserGroup")
async def update_user_group(ctx: ApiContext) -> dict[str, Any]:
    return await _update(ctx, GROUP, ctx.req("uuid"))


@api("DeleteUserGroup")
async def delete_user_group(ctx: ApiContext) -> dict[str, Any]:
    await _delete(ctx, GROUP)
    return {}


def _same_account(a: Any, b: Any) -> None:
    if a.accountUuid != b.accountUuid:
        raise invalid(f"{type(a).__name__} {a.uuid} and {type(b).__name__} {b.uuid} belong to different accounts")


async def _relate(
    ctx: ApiContext, ref: type, one: tuple[_Kind, str, str], others: tuple[_Kind, str, list[str]], attach: bool
) -> dict[str, Any]:
    """Attach (or detach) ``others`` to ``one``: (kind, the ref's column, uuid or uuids). Both
    sides must be the same account's; attaching twice, or detaching what is not attached, is no
    error."""
    kind, column, uuid = one
    other_kind, other_column, uuids = others
    if not uuids:
        raise invalid(f"name at least one {other_kind.label}")
    async with ctx.p.db.tx() as s:
        row = await load(s, kind.model, uuid, ctx, kind.label, owned=True)
        for other_uuid in uuids:
            other = await load(s, other_kind.model, str(other_uuid), ctx, other_kind.label, owned=True)
            _same_account(row, other)
            keys = {column: row.uuid, other_column: other.uuid}
            existing = (await s.execute(select(ref).where(*(getattr(ref, k) == v for k, v in keys.items())))).first()
            if attach and existing is None:
                s.add(ref(**keys))
            elif not attach and existing is not None:
                await s.delete(existing[0])
    return {}


@api("AddUserToGroup")
async def add_user_to_group(ctx: ApiContext) -> dict[str, Any]:
    return await _relate(
        ctx, m.UserGroupUserRef, (GROUP, "groupUuid", ctx.req("groupUuid")), (USER, "userUuid", [ctx.req("userUuid")]),
        attach=True,
    )


@api("RemoveUserFromGroup")
async def remove_user_from_group(ctx: ApiContext) -> dict[str, Any]:
    return await _relate(
        ctx, m.UserGroupUserRef, (GROUP, "groupUuid", ctx.req("groupUuid")), (USER, "userUuid", [ctx.req("userUuid")]),
        attach=False,
    )


# --- policies --------------------------------------------------------------------------------


@api("CreatePolicy")
async def create_policy(ctx: ApiContext) -> dict[str, Any]:
    statements = policy.parse_statements(ctx.params.get("statements"))
    return await _create(ctx, POLICY, statements=policy.dump_statements(statements))


@api("DeletePolicy")
async def delete_policy(ctx: ApiContext) -> dict[str, Any]:
    await _delete(ctx, POLICY)
    return {}


def _user_policies(ctx: ApiContext, policy_uuids: list[str], attach: bool) -> Any:
    return _relate(
        ctx, m.UserPolicyRef, (USER, "userUuid", ctx.req("userUuid")), (POLICY, "policyUuid", policy_uuids), attach
    )


@api("AttachPolicyToUser")
async def attach_policy_to_user(ctx: ApiContext) -> dict[str, Any]:
    return await _user_policies(ctx, [ctx.req("policyUuid")], attach=True)


@api("AttachPoliciesToUser")
async def attach_policies_to_user(ctx: ApiContext) -> dict[str, Any]:
    return await _user_policies(ctx, ctx.list("policyUuids"), attach=True)


@api("DetachPolicyFromUser")
async def detach_policy_from_user(ctx: ApiContext) -> dict[str, Any]:
    return await _user_policies(ctx, [ctx.req("policyUuid")], attach=False)


@api("DetachPoliciesFromUser")
async def detach_policies_from_user(ctx: ApiContext) -> dict[str, Any]:
    return await _user_policies(ctx, ctx.list("policyUuids"), attach=False)


def _group_policy(ctx: ApiContext, attach: bool) -> Any:
    return _relate(
        ctx, m.UserGroupPolicyRef, (GROUP, "groupUuid", ctx.req("groupUuid")),
        (POLICY, "policyUuid", [ctx.req("policyUuid")]), attach,
    )


@api("AttachPolicyToUserGroup")
async def attach_policy_to_user_group(ctx: ApiContext) -> dict[str, Any]:
    return await _group_policy(ctx, attach=True)


@api("DetachPolicyFromUserGroup")
async def detach_policy_from_user_group(ctx: ApiContext) -> dict[str, Any]:
    return await _group_policy(ctx, attach=False)


def _message(name: str) -> spec.MessageSpec:
    msg = spec.by_full_name().get(name) or spec.messages().get(name.removeprefix("API").removesuffix("Msg"))
    if msg is None:
        raise invalid(f"apiNames: {name} is not an API message")
    return msg


@api("CheckApiPermission")
async def check_api_permission(ctx: ApiContext) -> dict[str, Any]:
    """Allow or Deny for each of ``apiNames``, as the user's policies decide (or, for an account,
    whether the API is open to it)."""
    names = [str(n) for n in ctx.list("apiNames")]
    if not names:
        raise invalid("apiNames: name at least one API")
    msgs = {n: _message(n) for n in names}
    user_uuid = ctx.str("userUuid") or ctx.caller.user_uuid
    out: dict[str, str] = {}
    async with ctx.p.db.tx() as s:
        if user_uuid:
            user = await load(s, m.User, user_uuid, ctx, "User", owned=True)
            statements = await policy.user_statements(s, user.uuid)
        for name, msg in msgs.items():
            route = ROUTES.get(msg.name)
            if route is None or (route.admin and not ctx.caller.is_admin):
                out[name] = policy.DENY
            elif user_uuid:
                out[name] = policy.decide(statements, policy.action(msg))[0]
            else:
                out[name] = policy.ALLOW
    return {"inventory": out}
