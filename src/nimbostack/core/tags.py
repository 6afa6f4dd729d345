"""System tags configure behaviour (``userdata::``, ``sshkey::`` …); user tags label. Both are
resources with uuids, queryable and deletable."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import bindparam, select

from nimbostack.api.common import inv, load, new_uuid, register_queries
from nimbostack.api.dispatch import ApiContext, api
from nimbostack.core.errors import invalid, not_allowed, not_found
from nimbostack.db import models as m
from nimbostack.db import query

# Tagged resource type (ZStack's VO name) → model; a tag may only name an existing resource.
RESOURCE_TYPES: dict[str, type] = {
    "VmInstanceVO": m.VmInstance,
    "HostVO": m.Host,
    "KVMHostVO": m.Host,
    "ImageVO": m.Image,
    "VolumeVO": m.Volume,
    "L3NetworkVO": m.L3Network,
    "L2NetworkVO": m.L2Network,
    "ZoneVO": m.Zone,
    "ClusterVO": m.Cluster,
    "PrimaryStorageVO": m.PrimaryStorage,
    "BackupStorageVO": m.BackupStorage,
    "InstanceOfferingVO": m.InstanceOffering,
    "DiskOfferingVO": m.DiskOffering,
    "IpRangeVO": m.IpRange,
    "VmNicVO": m.VmNic,
    "AccountVO": m.Account,
}

_HOSTNAME = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
_IPV4 = r"(\d{1,3})(\.\d{1,3}){3}"

# System tags this platform understands, per resource type. Anything else is refused, so a typo
# does not silently do nothing.
SYSTEM_TAGS: dict[str, list[tuple[str, re.Pattern[str]]]] = {
    "VmInstanceVO": [
        ("userdata::{content}", re.compile(r"userdata::.+", re.S)),
        ("sshkey::{public key}", re.compile(r"sshkey::(ssh-|ecdsa-)[\w@.-]+ [A-Za-z0-9+/=]+( [^\n]*)?")),
        ("hostname::{host name}", re.compile(rf"hostname::{_HOSTNAME}")),
        ("staticIp::{l3NetworkUuid}::{ip}", re.compile(rf"staticIp::[0-9a-f]{{32}}::{_IPV4}")),
    ],
    "HostVO": [("agentPort::{port}", re.compile(r"agentPort::\d{1,5}"))],
    "L2NetworkVO": [("bridge::{name}", re.compile(r"bridge::[A-Za-z0-9_.-]{1,15}"))],
    "ImageVO": [("md5::{hex digest the download must match}", re.compile(r"md5::[0-9a-fA-F]{32}"))],
    "BackupStorageVO": [("agentPort::{port}", re.compile(r"agentPort::\d{1,5}"))],
}
SYSTEM_TAGS["KVMHostVO"] = SYSTEM_TAGS["HostVO"]


def validate_system_tag(resource_type: str, tag: str) -> None:
    known = SYSTEM_TAGS.get(resource_type, [])
    if any(p.fullmatch(tag) for _, p in known):
        return
    forms = ", ".join(f for f, _ in known) or "none"
    raise invalid(f"system tag {tag[:80]!r} is not valid for {resource_type}; valid forms: {forms}")


def tag_value(tags: list[str], prefix: str) -> str | None:
    for t in tags:
        if t.startswith(prefix):
            return t[len(prefix) :]
    return None


# built once, as the statements of every VM start (db/engine.py, "Statements built once")
_SYSTEM_TAGS = select(m.SystemTag.tag).where(m.SystemTag.resourceUuid == bindparam("resource"))


async def system_tags(s: Any, resource_uuid: str) -> list[str]:
    rows = await s.execute(_SYSTEM_TAGS, {"resource": resource_uuid})
    return [r for (r,) in rows]


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
    for listener in TAG_LISTENERS:
        await listener(ctx, resource_type, resource_uuid)


TAG_LISTENERS: list[Any] = []
