"""Account, session and global config APIs."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import delete, select

from nimbostack.core import query, quota
from nimbostack.core.auth import ADMIN_TYPE, ADMIN_UUID, hash_password
from nimbostack.core.context import ApiContext, api
from nimbostack.core.deadline import format_duration
from nimbostack.core.errors import PERMISSION_DENIED, ApiError, invalid, not_allowed
from nimbostack.core.globalconfig import API_TIMEOUT, definition
from nimbostack.core.query import fmt_date
from nimbostack.core.resources import inv, load, new_uuid, register_queries, require_admin, update_fields
from nimbostack.db import models as m
from nimbostack.db.engine import Tx

_SHA512 = re.compile(r"^[0-9a-fA-F]{128}$")

query.register(query.QueryTarget("QueryObjectAccountInventory", m.Account, "AccountInventory", scope="owned"))
query.register(
    query.QueryTarget(
        "QueryObjectAccountResourceRefInventory", m.AccountResourceRef, scope="owned", owner_column="resourceUuid"
    )
)
query.register(
    query.QueryTarget("QueryObjectGlobalConfigInventory", m.GlobalConfig, "GlobalConfigInventory", scope="public")
)
register_queries("QueryAccount", "QueryAccountResourceRef", "QueryGlobalConfig")


def session_inventory(token: str, row: m.Session) -> dict[str, Any]:
    return {
        "uuid": token,
        "accountUuid": row.accountUuid,
        "userUuid": row.userUuid,
        "expiredDate": fmt_date(row.expiredDate),
        "createDate": fmt_date(row.createDate),
    }


def password_digest(ctx: ApiContext) -> str:
    password = ctx.req("password")
    if not _SHA512.match(password):
        raise invalid("password must be the SHA-512 hex digest of the password (128 hex characters)")
    return password


@api("LogInByAccount", public=True)
async def login(ctx: ApiContext) -> dict[str, Any]:
    token, session = await ctx.p.auth.login(ctx.req("accountName"), password_digest(ctx), ctx.source)
    return {"inventory": session_inventory(token, session)}


@api("LogOut")
async def logout(ctx: ApiContext) -> dict[str, Any]:
    sid = ctx.str("sessionUuid") or ctx.caller.session_uuid
    if sid and sid != ctx.caller.session_uuid and not ctx.caller.is_admin:
        raise ApiError(PERMISSION_DENIED, "Permission denied", "an account can only log out its own sessions")
    if sid:
        await ctx.p.auth.logout(sid)
    return {}


@api("ValidateSession", public=True)
async def validate_session(ctx: ApiContext) -> dict[str, Any]:
    try:
        await ctx.p.auth.caller({"uuid": ctx.req("sessionUuid")}, type("R", (), {"public": False, "admin": False})())
        return {"validSession": True}
    except ApiError:
        return {"validSession": False}


@api("CreateAccount", admin=True)
async def create_account(ctx: ApiContext) -> dict[str, Any]:
    name = ctx.req("name").strip()
    async with ctx.p.db.tx() as s:
        if (await s.execute(select(m.Account).where(m.Account.name == name))).scalar_one_or_none():
            raise invalid(f"an account named {name} already exists")
        row = m.Account(
            uuid=new_uuid(ctx),
            name=name,
            description=ctx.str("description"),
            type=ctx.str("type", "Normal") or "Normal",
            passwordHash=await hash_password(password_digest(ctx)),
        )
        s.add(row)
        s.add(
            m.AccountResourceRef(
                accountUuid=row.uuid, ownerAccountUuid=row.uuid, resourceUuid=row.uuid, resourceType="AccountVO"
            )
        )
        await s.flush()
        if row.type != ADMIN_TYPE:
            for q in quota.default_rows(row.uuid):
                s.add(q)
        return {"inventory": await inv(s, "QueryObjectAccountInventory", row)}


@api("UpdateAccount")
async def update_account(ctx: ApiContext) -> dict[str, Any]:
    uuid = ctx.str("uuid") or ctx.caller.account_uuid
    if uuid != ctx.caller.account_uuid:
        require_admin(ctx)
    async with ctx.p.db.tx() as s:
        row = await load(s, m.Account, uuid, ctx, "Account")
        update_fields(row, ctx)
        if ctx.str("password"):
            row.passwordHash = await hash_password(password_digest(ctx))
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectAccountInventory", row)}


@api("DeleteAccount", admin=True)
async def delete_account(ctx: ApiContext) -> dict[str, Any]:
    uuid = ctx.req("uuid")
    if uuid == ADMIN_UUID:
        raise not_allowed("the admin account cannot be deleted")
    async with ctx.p.db.tx() as s:
        row = await load(s, m.Account, uuid, ctx, "Account")
        owned = (
            (
                await s.execute(
                    select(m.AccountResourceRef.resourceUuid).where(
                        m.AccountResourceRef.accountUuid == uuid,
                        m.AccountResourceRef.resourceType.not_in(IDENTITY_TYPES),
                    )
                )
            )
            .scalars()
            .all()
        )
        if owned:
            raise not_allowed(f"account {row.name} still owns {len(owned)} resources; delete them first")
        # its users, groups and policies go with it, and what it was given or gave
        await delete_identities(s, uuid)
        await s.execute(delete(m.Session).where(m.Session.accountUuid == uuid))
        await s.execute(delete(m.AccountResourceRef).where(m.AccountResourceRef.resourceUuid == uuid))
        await s.delete(row)
    return {}


@api("UpdateGlobalConfig", admin=True)
async def update_global_config(ctx: ApiContext) -> dict[str, Any]:
    category, name = ctx.req("category"), ctx.req("name")
    # no value: back to the default (an apiTimeout config is removed)
    row = await ctx.p.config.update(category, name, ctx.params.get("value"))
    return {"inventory": query.plain(row, query.TARGETS["QueryObjectGlobalConfigInventory"].fields())}


@api("GetGlobalConfig")
async def get_global_config(ctx: ApiContext) -> dict[str, Any]:
    category = ctx.req("category")
    d = definition(category, ctx.req("name"))
    async with ctx.p.db.tx() as s:
        row = (
            await s.execute(
                select(m.GlobalConfig).where(m.GlobalConfig.category == category, m.GlobalConfig.name == d.name)
            )
        ).scalar_one_or_none()
        stored = row is not None
        if row is None:  # an apiTimeout config that was never set
            row = m.GlobalConfig(category=category, name=d.name, description=d.description,
                                 defaultValue=d.default, value=d.default)
        out = await inv(s, "QueryObjectGlobalConfigInventory", row)
    if category == API_TIMEOUT:
        # what it falls back to without a global config: zstack.properties' value, or the built-in one
        out["defaultValue"] = format_duration(ctx.p.timeouts.file_default(d.name))
        if not stored:
            out["value"] = out["defaultValue"]
    return {"inventory": out}


# what goes with its account when the account is deleted
IDENTITY_TYPES = ("AccountVO", "UserVO", "UserGroupVO", "PolicyVO")


async def delete_identities(s: Tx, account_uuid: str) -> None:
    """An account's users, user groups, policies, quotas and sharings, as the account is deleted."""
    users = select(m.User.uuid).where(m.User.accountUuid == account_uuid)
    groups = select(m.UserGroup.uuid).where(m.UserGroup.accountUuid == account_uuid)
    await s.execute(delete(m.Session).where(m.Session.userUuid.in_(users)))
    await s.execute(delete(m.UserGroupUserRef).where(m.UserGroupUserRef.userUuid.in_(users)))
    await s.execute(delete(m.UserPolicyRef).where(m.UserPolicyRef.userUuid.in_(users)))
    await s.execute(delete(m.UserGroupPolicyRef).where(m.UserGroupPolicyRef.groupUuid.in_(groups)))
    for model, kind in ((m.User, "UserVO"), (m.UserGroup, "UserGroupVO"), (m.Policy, "PolicyVO")):
        await s.execute(
            delete(m.AccountResourceRef).where(
                m.AccountResourceRef.accountUuid == account_uuid, m.AccountResourceRef.resourceType == kind
            )
        )
        await s.execute(delete(model).where(model.accountUuid == account_uuid))
    await s.execute(delete(m.Quota).where(m.Quota.identityUuid == account_uuid))
    await s.execute(
        delete(m.SharedResource).where(
            (m.SharedResource.ownerAccountUuid == account_uuid) | (m.SharedResource.receiverAccountUuid == account_uuid)
        )
    )


def is_admin_account(account: m.Account) -> bool:
    return account.type == ADMIN_TYPE
