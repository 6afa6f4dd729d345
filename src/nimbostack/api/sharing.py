"""Quotas (QueryQuota, UpdateQuota, GetAccountQuotaUsage), sharing a resource with other accounts
(ShareResource, RevokeResourceSharing, QuerySharedResource) and who owns what
(ChangeResourceOwner, GetResourceAccount)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, delete, or_, select, update

from nimbostack.api.identity import IDENTITY_TYPES
from nimbostack.core import query, quota
from nimbostack.core.auth import ADMIN_UUID, Caller
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import invalid, not_allowed, not_found
from nimbostack.core.resources import check_uuid, inv, load, new_uuid, register_queries
from nimbostack.db import models as m
from nimbostack.db.engine import Tx


def _shared_scope(caller: Caller) -> ColumnElement[bool]:
    """A normal account sees what it shared and what is shared with it."""
    r = m.SharedResource
    return or_(
        r.ownerAccountUuid == caller.account_uuid, r.receiverAccountUuid == caller.account_uuid, r.toPublic.is_(True)
    )


query.register(
    query.QueryTarget(
        "QueryObjectQuotaInventory",
        m.Quota,
        owner_column="identityUuid",
        joins={"account": query.Join("identityUuid", "QueryObjectAccountInventory", "uuid")},
    )
)
query.register(
    query.QueryTarget(
        "QueryObjectSharedResourceInventory", m.SharedResource, "SharedResourceInventory", scope_filter=_shared_scope
    )
)
register_queries("QueryQuota", "QuerySharedResource")


# --- quotas ----------------------------------------------------------------------------------


@api("UpdateQuota", admin=True)
async def update_quota(ctx: ApiContext) -> dict[str, Any]:
    name = ctx.req("name")
    if name not in quota.DEFAULTS:
        raise invalid(f"name: {name} is not a quota; quotas are {', '.join(quota.DEFAULTS)}")
    value = ctx.int("value", minimum=0)
    assert value is not None
    async with ctx.p.db.tx() as s:
        account = await load(s, m.Account, ctx.req("identityUuid"), ctx, "Account")
        if account.uuid == ADMIN_UUID or account.type == "SystemAdmin":
            raise not_allowed("an admin account has no quotas")
        row = (
            await s.execute(select(m.Quota).where(m.Quota.identityUuid == account.uuid, m.Quota.name == name))
        ).scalar_one_or_none()
        if row is None:
            row = m.Quota(uuid=new_uuid(), name=name, identityUuid=account.uuid, identityType="AccountVO")
            s.add(row)
        row.value = value
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectQuotaInventory", row)}


@api("GetAccountQuotaUsage")
async def get_account_quota_usage(ctx: ApiContext) -> dict[str, Any]:
    uuid = ctx.str("uuid") or ctx.caller.account_uuid
    async with ctx.p.db.tx() as s:
        account = await load(s, m.Account, uuid, ctx, "Account")
        if not ctx.caller.is_admin and account.uuid != ctx.caller.account_uuid:
            raise not_found("Account", uuid)
        if account.type == "SystemAdmin":
            return {"usages": []}
        limits = await quota.limits(s, account.uuid)
        usages = [
            {"name": name, "total": total, "used": await quota.used(s, account.uuid, name)}
            for name, total in limits.items()
        ]
    return {"usages": usages}


# --- ownership -------------------------------------------------------------------------------


async def _refs(s: Tx, uuids: list[str]) -> dict[str, m.AccountResourceRef]:
    rows = (
        (await s.execute(select(m.AccountResourceRef).where(m.AccountResourceRef.resourceUuid.in_(uuids))))
        .scalars()
        .all()
    )
    return {r.resourceUuid: r for r in rows}


@api("GetResourceAccount")
async def get_resource_account(ctx: ApiContext) -> dict[str, Any]:
    uuids = [check_uuid("resourceUuids", str(u)) for u in ctx.list("resourceUuids")]
    if not uuids:
        raise invalid("resourceUuids: name at least one resource")
    out: dict[str, Any] = {}
    async with ctx.p.db.tx() as s:
        refs = await _refs(s, uuids)
        for uuid in uuids:
            ref = refs.get(uuid)
            if ref is None:
                continue
            account = await s.get(m.Account, ref.accountUuid)
            if account is not None:
                out[uuid] = await inv(s, "QueryObjectAccountInventory", account)
    return {"inventories": out}


@api("ChangeResourceOwner", admin=True)
async def change_resource_owner(ctx: ApiContext) -> dict[str, Any]:
    uuid = check_uuid("resourceUuid", ctx.req("resourceUuid"))
    async with ctx.p.db.tx() as s:
        account = await load(s, m.Account, ctx.req("accountUuid"), ctx, "Account")
        ref = (await _refs(s, [uuid])).get(uuid)
        if ref is None:
            raise not_found("Resource", uuid)
        if ref.resourceType in IDENTITY_TYPES:
            raise not_allowed(f"a {ref.resourceType} belongs to its account for good")
        if ref.accountUuid != account.uuid:
            await s.execute(
                delete(m.SharedResource).where(
                    m.SharedResource.resourceUuid == uuid, m.SharedResource.receiverAccountUuid == account.uuid
                )
            )
            await s.execute(
                update(m.SharedResource)
                .where(m.SharedResource.resourceUuid == uuid)
                .values(ownerAccountUuid=account.uuid)
            )
            ref.accountUuid = ref.ownerAccountUuid = account.uuid
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectAccountResourceRefInventory", ref)}


# --- sharing ---------------------------------------------------------------------------------


async def _shared_refs(ctx: ApiContext, s: Tx) -> list[m.AccountResourceRef]:
    """The resources of ``resourceUuids``, each of which the caller must own (an admin: any)."""
    uuids = [check_uuid("resourceUuids", str(u)) for u in ctx.list("resourceUuids")]
    if not uuids:
        raise invalid("resourceUuids: name at least one resource")
    refs = await _refs(s, uuids)
    out = []
    for uuid in dict.fromkeys(uuids):
        ref = refs.get(uuid)
        if ref is None or (not ctx.caller.is_admin and ref.accountUuid != ctx.caller.account_uuid):
            raise not_found("Resource", uuid)
        if ref.resourceType in IDENTITY_TYPES:
            raise not_allowed(f"a {ref.resourceType} cannot be shared")
        out.append(ref)
    return out


async def _accounts(ctx: ApiContext, s: Tx) -> list[str]:
    uuids = list(dict.fromkeys(check_uuid("accountUuids", str(u)) for u in ctx.list("accountUuids")))
    for uuid in uuids:
        await load(s, m.Account, uuid, ctx, "Account")
    return uuids


@api("ShareResource")
async def share_resource(ctx: ApiContext) -> dict[str, Any]:
    to_public = ctx.bool("toPublic")
    async with ctx.p.db.tx() as s:
        refs = await _shared_refs(ctx, s)
        accounts = await _accounts(ctx, s)
        if not accounts and not to_public:
            raise invalid("ShareResource needs accountUuids or toPublic=true")
        for ref in refs:
            existing = (
                await s.execute(
                    select(m.SharedResource.receiverAccountUuid, m.SharedResource.toPublic).where(
                        m.SharedResource.resourceUuid == ref.resourceUuid
                    )
                )
            ).all()
            have = {r.receiverAccountUuid for r in existing if not r.toPublic}
            public = any(r.toPublic for r in existing)
            wanted: list[tuple[str | None, bool]] = [
                (a, False) for a in accounts if a not in have and a != ref.accountUuid
            ]
            if to_public and not public:
                wanted.append((None, True))
            for receiver, everyone in wanted:
                s.add(
                    m.SharedResource(
                        uuid=new_uuid(),
                        ownerAccountUuid=ref.accountUuid,
                        receiverAccountUuid=receiver,
                        toPublic=everyone,
                        resourceType=ref.resourceType,
                        resourceUuid=ref.resourceUuid,
                    )
                )
    return {}


@api("RevokeResourceSharing")
async def revoke_resource_sharing(ctx: ApiContext) -> dict[str, Any]:
    to_public, everything = ctx.bool("toPublic"), ctx.bool("all")
    async with ctx.p.db.tx() as s:
        refs = await _shared_refs(ctx, s)
        accounts = await _accounts(ctx, s)
        if not (accounts or to_public or everything):
            raise invalid("RevokeResourceSharing needs accountUuids, toPublic=true or all=true")
        r = m.SharedResource
        which: list[ColumnElement[bool]] = []
        if not everything:
            if accounts:
                which.append(r.receiverAccountUuid.in_(accounts))
            if to_public:
                which.append(r.toPublic.is_(True))
        mine = r.resourceUuid.in_([x.resourceUuid for x in refs])
        await s.execute(delete(r).where(mine, or_(*which)) if which else delete(r).where(mine))
    return {}
