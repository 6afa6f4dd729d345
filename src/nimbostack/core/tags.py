"""System tags configure behaviour (``userdata::``, ``sshkey::`` …); user tags label. Both are
resources with uuids, queryable and deletable."""

from __future__ import annotations

import re

from sqlalchemy import bindparam, select

from nimbostack.core.errors import invalid
from nimbostack.db import models as m
from nimbostack.db.engine import Tx

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


async def system_tags(s: Tx, resource_uuid: str) -> list[str]:
    rows = await s.execute(_SYSTEM_TAGS, {"resource": resource_uuid})
    return [r for (r,) in rows]
