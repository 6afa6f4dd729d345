"""What a user (a LogInByUser session) may call: ZStack's policies.

A policy is a list of statements ``{"name", "effect": "Allow"|"Deny", "actions": [pattern, ...]}``;
an API's action is ``<category>:API<Name>Msg`` (``instance:APICreateVmInstanceMsg``). A pattern
matches an action as a shell glob (``instance:*``, ``*``); ZStack 1.2's regular-expression idiom
``.*`` (``instance:.*``, ``.*``) reads as ``*`` (other regular expressions are not evaluated: a
tenant's pattern must not be able to make the server backtrack for ever); the API may be named
with or without its ``API``/``Msg``.
A user may call an API only if a statement of a policy attached to it or to one of its groups
allows it and none denies it: Deny wins, and nothing is allowed by default. An account's own
sessions are not subject to policies."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import select

from nimbostack.core import spec
from nimbostack.core.errors import PERMISSION_DENIED, ApiError, invalid
from nimbostack.db.engine import Tx
from nimbostack.db.models import Policy, UserGroupPolicyRef, UserGroupUserRef, UserPolicyRef

ALLOW, DENY = "Allow", "Deny"

# ZStack's action categories, by the package of the message (org.zstack.header.<package>)
_CATEGORIES = {
    "vm": "instance",
    "network.l3": "l3Network",
    "network.l2": "l2Network",
    "storage.primary": "primaryStorage",
    "storage.backup": "backupStorage",
    "storage.snapshot": "volumeSnapshot",
    "network.service": "networkService",
    "network.service.eip": "eip",
    "network.service.vip": "vip",
    "storage.primary.local": "localStorage",
    "storage.backup.sftp": "sftpBackupStorage",
}

# what a user may always do with its own session, whatever its policies
ALWAYS = {"LogOut", "ValidateSession", "LogInByUser", "LogInByAccount"}


def category(msg: spec.MessageSpec) -> str:
    package = msg.package.removeprefix("org.zstack.").removeprefix("header.")
    return _CATEGORIES.get(package, package.rsplit(".", 1)[-1])


def action(msg: spec.MessageSpec) -> str:
    """``instance:APICreateVmInstanceMsg``"""
    return f"{category(msg)}:API{msg.name}Msg"


@dataclass(frozen=True)
class Statement:
    name: str
    effect: str
    actions: tuple[str, ...]

    def inventory(self) -> dict[str, Any]:
        return {"name": self.name, "effect": self.effect, "actions": list(self.actions)}


def parse_statements(raw: Any) -> list[Statement]:
    """CreatePolicy's ``statements``: a JSON array (or its text, as the shell sends it) of
    objects with an ``effect`` and a non-empty list of ``actions``."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise invalid('statements must be a JSON array like [{"effect": "Allow", "actions": ["*"]}]') from None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise invalid('statements must be a non-empty list of {"effect": "Allow"|"Deny", "actions": [...]}')
    out: list[Statement] = []
    for i, st in enumerate(raw):
        if not isinstance(st, dict):
            raise invalid(f"statements[{i}] must be an object")
        unknown = set(st) - {"name", "effect", "actions", "principals", "resources"}
        if unknown:
            raise invalid(f"statements[{i}] has no field {', '.join(sorted(unknown))}")
        effect = st.get("effect")
        if effect not in (ALLOW, DENY):
            raise invalid(f"statements[{i}].effect must be Allow or Deny, got {effect!r}")
        actions = st.get("actions")
        if isinstance(actions, str):
            actions = [actions]
        if not isinstance(actions, list) or not actions or not all(isinstance(a, str) and a.strip() for a in actions):
            raise invalid(f"statements[{i}].actions must be a non-empty list of API name patterns")
        if any(len(a) > 512 for a in actions):
            raise invalid(f"statements[{i}].actions: a pattern is longer than 512 characters")
        name = st.get("name", f"statement{i}")
        if not isinstance(name, str):
            raise invalid(f"statements[{i}].name must be a string")
        out.append(Statement(name, effect, tuple(a.strip() for a in actions)))
    return out


def load_statements(text: str) -> list[Statement]:
    return parse_statements(json.loads(text))


def dump_statements(statements: list[Statement]) -> str:
    return json.dumps([s.inventory() for s in statements])


@lru_cache(maxsize=16384)
def matches(pattern: str, act: str) -> bool:
    """Whether ``pattern`` names action ``act`` (``category:APINameMsg``)."""
    cat, _, api = act.partition(":")
    short = api.removeprefix("API").removesuffix("Msg")
    glob = pattern.replace(".*", "*")
    candidates = (act, f"{cat}:{short}") if ":" in glob else (api, short)
    return any(fnmatch.fnmatchcase(text, glob) for text in candidates)


async def user_statements(s: Tx, user_uuid: str) -> list[tuple[str, Statement]]:
    """(policy name, statement) of every policy attached to the user or to one of its groups."""
    groups = select(UserGroupUserRef.groupUuid).where(UserGroupUserRef.userUuid == user_uuid)
    direct = select(UserPolicyRef.policyUuid).where(UserPolicyRef.userUuid == user_uuid)
    via = select(UserGroupPolicyRef.policyUuid).where(UserGroupPolicyRef.groupUuid.in_(groups))
    rows = (
        await s.execute(select(Policy.name, Policy.statements).where(Policy.uuid.in_(direct.union(via))))
    ).all()
    return [(name, st) for name, text in rows for st in load_statements(text)]


def decide(statements: list[tuple[str, Statement]], act: str) -> tuple[str, str]:
    """(Allow or Deny, why) for action ``act``."""
    allowed_by = None
    for policy_name, st in statements:
        if any(matches(p, act) for p in st.actions):
            if st.effect == DENY:
                return DENY, f"policy {policy_name} denies {act}"
            allowed_by = allowed_by or policy_name
    if allowed_by is None:
        return DENY, f"no policy of the user allows {act}"
    return ALLOW, f"policy {allowed_by} allows {act}"


def exempt(msg: spec.MessageSpec, params: dict[str, Any], user_uuid: str) -> bool:
    """What a user may do with its own session whatever its policies: log out, and read or
    change itself (its password) and ask what it may call."""
    if msg.name in ALWAYS:
        return True
    if msg.name == "UpdateUser":
        return params.get("uuid") in (None, "", user_uuid)
    if msg.name == "CheckApiPermission":
        return params.get("userUuid") in (None, "", user_uuid)
    return False


async def check(s: Tx, user_uuid: str, msg: spec.MessageSpec, params: dict[str, Any]) -> None:
    """Raise PERMISSION_DENIED unless the user's policies allow ``msg``."""
    if exempt(msg, params, user_uuid):
        return
    effect, why = decide(await user_statements(s, user_uuid), action(msg))
    if effect == DENY:
        raise ApiError(
            PERMISSION_DENIED,
            "Permission denied by policy",
            f"{why}; the account can attach a policy allowing it (AttachPolicyToUser, AttachPolicyToUserGroup)",
        )
