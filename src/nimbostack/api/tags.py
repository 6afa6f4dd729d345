"""The tag API family: CreateSystemTag, CreateUserTag, UpdateSystemTag, DeleteTag and the tag queries."""

from __future__ import annotations

from typing import Any

from nimbostack.core import hooks, query
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import invalid, not_allowed, not_found
from nimbostack.core.resources import inv, load, new_uuid, register_queries
from nimbostack.core.tags import RESOURCE_TYPES, validate_system_tag
from nimbostack.db import models as m


def _tag_scope(model: type) -> query.QueryTarget:
    return query.QueryTarget(
        f"QueryObject{'System' if model is m.SystemTag else 'User'}TagInventory",
        model,
        scope="owned",
        owner_column="resourceUuid",
    )


query.register(_tag_scope(m.SystemTag))
query.register(_tag_scope(m.UserTag))
register_queries("QuerySystemTag", "QueryUserTag")


async def _check_resource(s: Any, ctx: ApiContext, resource_type: str, resource_uuid: str) -> None:
    model = RESOURCE_TYPES.get(resource_type)
    if model is None:
        raise invalid(f"resourceType {resource_type!r} is not taggable; valid: {', '.join(sorted(RESOURCE_TYPES))}")
    await load(s, model, resource_uuid, ctx, resource_type[:-2], owned=True)


@api("CreateSystemTag")
async def create_system_tag(ctx: ApiContext) -> dict[str, Any]:
    rtype, ruuid, tag = ctx.req("resourceType"), ctx.req("resourceUuid"), ctx.req("tag")
    validate_system_tag(rtype, tag)
    async with ctx.p.db.tx() as s:
        await _check_resource(s, ctx, rtype, ruuid)
        row = m.SystemTag(uuid=new_uuid(), resourceUuid=ruuid, resourceType=rtype, tag=tag)
        s.add(row)
        await s.flush()
        out = await inv(s, "QueryObjectSystemTagInventory", row)
    await _changed(ctx, rtype, ruuid)
    return {"inventory": out}


@api("CreateUserTag")
async def create_user_tag(ctx: ApiContext) -> dict[str, Any]:
    rtype, tag = ctx.req("resourceType"), ctx.req("tag")
    ruuid = ctx.str("resourceUuid")  # the table forgot it; every ZStack client sends it
    if not ruuid:
        raise invalid("missing mandatory field resourceUuid")
    async with ctx.p.db.tx() as s:
        await _check_resource(s, ctx, rtype, ruuid)
        row = m.UserTag(uuid=new_uuid(), resourceUuid=ruuid, resourceType=rtype, tag=tag)
        s.add(row)
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectUserTagInventory", row)}


@api("UpdateSystemTag")
async def update_system_tag(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await s.get(m.SystemTag, ctx.req("uuid"))
        if row is None:
            raise not_found("SystemTag", ctx.req("uuid"))
        await _check_resource(s, ctx, row.resourceType, row.resourceUuid)
        if row.inherent:
            raise not_allowed(f"system tag {row.uuid} is inherent and cannot be changed")
        tag = ctx.req("tag")
        validate_system_tag(row.resourceType, tag)
        if tag.split("::", 1)[0] != row.tag.split("::", 1)[0]:
            raise invalid(f"UpdateSystemTag changes a tag's value, not its kind ({row.tag.split('::', 1)[0]}::)")
        row.tag = tag
        await s.flush()
        out = await inv(s, "QueryObjectSystemTagInventory", row)
    await _changed(ctx, row.resourceType, row.resourceUuid)
    return {"inventory": out}


@api("DeleteTag")
async def delete_tag(ctx: ApiContext) -> dict[str, Any]:
    uuid = ctx.req("uuid")
    async with ctx.p.db.tx() as s:
        row: Any = await s.get(m.SystemTag, uuid) or await s.get(m.UserTag, uuid)
        if row is None:
            raise not_found("Tag", uuid)
        await _check_resource(s, ctx, row.resourceType, row.resourceUuid)
        if getattr(row, "inherent", False):
            raise not_allowed(f"system tag {uuid} is inherent and cannot be deleted")
        await s.delete(row)
        system = isinstance(row, m.SystemTag)
    if system:
        await _changed(ctx, row.resourceType, row.resourceUuid)
    return {}


async def _changed(ctx: ApiContext, resource_type: str, resource_uuid: str) -> None:
    """Let network services refresh what they serve from tags (userdata, keys) at once."""
    await hooks.tags_changed(ctx, resource_type, resource_uuid)
