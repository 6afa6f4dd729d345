"""Users, user groups and policies of an account (ZStack 1.2's identity family). A user logs in with
LogInByUser and acts for its account, within what its policies allow (core/policy.py)."""

from __future__ import annotations

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


# --- users -----------------------------------------------------------------------------------


def _name(ctx: ApiContext, required: bool = True) -> str | None:
    name = ctx.req("name") if required else ctx.str("name")
    if name is not None and not name.strip():
        raise invalid("name must not be empty")
    return name.strip() if name is not None else None


async def _unique_user_name(s: Tx, account_uuid: str, name: str, uuid: str | None = None) -> None:
    taken = (
        await s.execute(select(m.User.uuid).where(m.User.accountUuid == account_uuid, m.User.name == name))
    ).scalar_one_or_none()
    if taken is not None and taken != uuid:
        raise invalid(f"the account already has a user named {name}")


@api("CreateUser")
async def create_user(ctx: ApiContext) -> dict[str, Any]:
    name = _name(ctx)
    assert name is not None
    hashed = await hash_password(password_digest(ctx))
    async with ctx.p.db.tx() as s:
        await _unique_user_name(s, ctx.caller.account_uuid, name)
        row = m.User(
            uuid=new_uuid(ctx),
            accountUuid=ctx.caller.account_uuid,
            name=name,
            description=ctx.str("description"),
            passwordHash=hashed,
        )
        s.add(row)
        await own(s, ctx, row.uuid, "UserVO")
        await add_creation_tags(s, ctx, row.uuid, "UserVO")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectUserInventory", row)}


@api("UpdateUser")
async def update_user(ctx: ApiContext) -> dict[str, Any]:
    uuid = ctx.str("uuid") or ctx.caller.user_uuid
    if not uuid:
        raise invalid("uuid: which user to update (an account's session has no user of its own)")
    hashed = await hash_password(password_digest(ctx)) if ctx.str("password") else None
    async with ctx.p.db.tx() as s:
        row = await load(s, m.User, uuid, ctx, "User", owned=True)
        name = _name(ctx, required=False)
        if name is not None:
            await _unique_user_name(s, row.accountUuid, name, row.uuid)
            row.name = name
        if ctx.str("description") is not None:
            row.description = ctx.str("description")
        if hashed is not None:
            row.passwordHash = hashed
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectUserInventory", row)}


async def delete_users(s: Tx, uuids: list[str]) -> None:
    """The users, their sessions and their group and policy attachments."""
    await s.execute(delete(m.Session).where(m.Session.userUuid.in_(uuids)))
    await s.execute(delete(m.UserGroupUserRef).where(m.UserGroupUserRef.userUuid.in_(uuids)))
    await s.execute(delete(m.UserPolicyRef).where(m.UserPolicyRef.userUuid.in_(uuids)))
    await disown(s, uuids)
    await s.execute(delete(m.User).where(m.User.uuid.in_(uuids)))


@api("DeleteUser")
async def delete_user(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.User, ctx.req("uuid"), ctx, "User", owned=True)
        await delete_users(s, [row.uuid])
    ctx.p.auth.forget_users([row.uuid])
    return {}


# --- user groups -----------------------------------------------------------------------------


@api("CreateUserGroup")
async def create_user_group(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = m.UserGroup(
            uuid=new_uuid(ctx), accountUuid=ctx.caller.account_uuid, name=_name(ctx), description=ctx.str("description")
        )
        s.add(row)
        await own(s, ctx, row.uuid, "UserGroupVO")
        await add_creation_tags(s, ctx, row.uuid, "UserGroupVO")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectUserGroupInventory", row)}


@api("UpdateUserGroup")
async def update_user_group(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.UserGroup, ctx.req("uuid"), ctx, "UserGroup", owned=True)
        name = _name(ctx, required=False)
        if name is not None:
            row.name = name
        if ctx.str("description") is not None:
            row.description = ctx.str("description")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectUserGroupInventory", row)}


async def delete_groups(s: Tx, uuids: list[str]) -> None:
    await s.execute(delete(m.UserGroupUserRef).where(m.UserGroupUserRef.groupUuid.in_(uuids)))
    await s.execute(delete(m.UserGroupPolicyRef).where(m.UserGroupPolicyRef.groupUuid.in_(uuids)))
    await disown(s, uuids)
    await s.execute(delete(m.UserGroup).where(m.UserGroup.uuid.in_(uuids)))


@api("DeleteUserGroup")
async def delete_user_group(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.UserGroup, ctx.req("uuid"), ctx, "UserGroup", owned=True)
        await delete_groups(s, [row.uuid])
    return {}


def _same_account(a: Any, b: Any) -> None:
    if a.accountUuid != b.accountUuid:
        raise invalid(f"{type(a).__name__} {a.uuid} and {type(b).__name__} {b.uuid} belong to different accounts")


async def _link(s: Tx, model: type, **keys: str) -> None:
    """Add the attachment row unless it is there already (attaching twice is no error)."""
    where = [getattr(model, k) == v for k, v in keys.items()]
    if (await s.execute(select(model).where(*where))).first() is None:
        s.add(model(**keys))


@api("AddUserToGroup")
async def add_user_to_group(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        user = await load(s, m.User, ctx.req("userUuid"), ctx, "User", owned=True)
        group = await load(s, m.UserGroup, ctx.req("groupUuid"), ctx, "UserGroup", owned=True)
        _same_account(user, group)
        await _link(s, m.UserGroupUserRef, userUuid=user.uuid, groupUuid=group.uuid)
    return {}


@api("RemoveUserFromGroup")
async def remove_user_from_group(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        user = await load(s, m.User, ctx.req("userUuid"), ctx, "User", owned=True)
        group = await load(s, m.UserGroup, ctx.req("groupUuid"), ctx, "UserGroup", owned=True)
        await s.execute(
            delete(m.UserGroupUserRef).where(
                m.UserGroupUserRef.userUuid == user.uuid, m.UserGroupUserRef.groupUuid == group.uuid
            )
        )
    return {}


# --- policies --------------------------------------------------------------------------------


@api("CreatePolicy")
async def create_policy(ctx: ApiContext) -> dict[str, Any]:
    statements = policy.parse_statements(ctx.params.get("statements"))
    async with ctx.p.db.tx() as s:
        row = m.Policy(
            uuid=new_uuid(ctx),
            accountUuid=ctx.caller.account_uuid,
            name=_name(ctx),
            description=ctx.str("description"),
            statements=policy.dump_statements(statements),
        )
        s.add(row)
        await own(s, ctx, row.uuid, "PolicyVO")
        await add_creation_tags(s, ctx, row.uuid, "PolicyVO")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectPolicyInventory", row)}


async def delete_policies(s: Tx, uuids: list[str]) -> None:
    await s.execute(delete(m.UserPolicyRef).where(m.UserPolicyRef.policyUuid.in_(uuids)))
    await s.execute(delete(m.UserGroupPolicyRef).where(m.UserGroupPolicyRef.policyUuid.in_(uuids)))
    await disown(s, uuids)
    await s.execute(delete(m.Policy).where(m.Policy.uuid.in_(uuids)))


@api("DeletePolicy")
async def delete_policy(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.Policy, ctx.req("uuid"), ctx, "Policy", owned=True)
        await delete_policies(s, [row.uuid])
    return {}


async def _user_policies(ctx: ApiContext, policy_uuids: list[str], attach: bool) -> dict[str, Any]:
    if not policy_uuids:
        raise invalid("name at least one policy")
    async with ctx.p.db.tx() as s:
        user = await load(s, m.User, ctx.req("userUuid"), ctx, "User", owned=True)
        for uuid in policy_uuids:
            row = await load(s, m.Policy, str(uuid), ctx, "Policy", owned=True)
            _same_account(user, row)
            if attach:
                await _link(s, m.UserPolicyRef, userUuid=user.uuid, policyUuid=row.uuid)
            else:
                await s.execute(
                    delete(m.UserPolicyRef).where(
                        m.UserPolicyRef.userUuid == user.uuid, m.UserPolicyRef.policyUuid == row.uuid
                    )
                )
    return {}


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


async def _group_policy(ctx: ApiContext, attach: bool) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        group = await load(s, m.UserGroup, ctx.req("groupUuid"), ctx, "UserGroup", owned=True)
        row = await load(s, m.Policy, ctx.req("policyUuid"), ctx, "Policy", owned=True)
        _same_account(group, row)
        if attach:
            await _link(s, m.UserGroupPolicyRef, groupUuid=group.uuid, policyUuid=row.uuid)
        else:
            await s.execute(
                delete(m.UserGroupPolicyRef).where(
                    m.UserGroupPolicyRef.groupUuid == group.uuid, m.UserGroupPolicyRef.policyUuid == row.uuid
                )
            )
    return {}


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
