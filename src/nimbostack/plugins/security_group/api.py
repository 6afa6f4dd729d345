"""The security group API of ZStack 1.2 (``org.zstack.network.securitygroup``): groups, their
rules, the L3 networks they are attached to and the VM NICs in them.

A change that makes hosts filter more or differently is written first and then pushed to the
hosts running the NICs it touches; one that removes something is pushed first (the state without
it) and written when every host applied it. Either way a host that fails undoes the change: the
database is put back and the hosts that had applied it get the previous state again, and the
caller gets the host's error."""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from nimbostack.core import query
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import ApiError, invalid, not_found
from nimbostack.core.resources import (
    ENABLE_DISABLE,
    add_creation_tags,
    disown,
    inv,
    load,
    new_uuid,
    own,
    register_queries,
    state_event,
    update_fields,
)
from nimbostack.db import models as m
from nimbostack.db.engine import Tx
from nimbostack.network import providers
from nimbostack.plugins.security_group import service
from nimbostack.plugins.security_group.service import Excluded

log = logging.getLogger(__name__)

# --- errors: stable codes a client may match on ---------------------------------------------

BAD_RULE_TYPE = "SG.1001"
BAD_PROTOCOL = "SG.1002"
BAD_CIDR = "SG.1003"
BAD_PORT_RANGE = "SG.1004"
PROTOCOL_PORT_MISMATCH = "SG.1005"
DUPLICATE_RULE = "SG.1006"
L3_WITHOUT_SERVICE = "SG.1007"
NIC_NOT_ON_ATTACHED_L3 = "SG.1008"
ALREADY_ATTACHED = "SG.1009"
NOT_ATTACHED = "SG.1010"
BAD_RULES = "SG.1011"

_DESCRIPTIONS = {
    BAD_RULE_TYPE: "A security group rule's type must be Ingress or Egress",
    BAD_PROTOCOL: "A security group rule's protocol must be TCP, UDP, ICMP or ALL",
    BAD_CIDR: "A security group rule's allowedCidr is not an IPv4 CIDR",
    BAD_PORT_RANGE: "A security group rule's ports are out of range",
    PROTOCOL_PORT_MISMATCH: "A security group rule's ports do not fit its protocol",
    DUPLICATE_RULE: "The security group already has this rule",
    L3_WITHOUT_SERVICE: "The L3 network does not have the SecurityGroup network service",
    NIC_NOT_ON_ATTACHED_L3: "The VM NIC is not on an L3 network attached to the security group",
    ALREADY_ATTACHED: "The security group is already attached to the L3 network",
    NOT_ATTACHED: "The security group is not attached to the L3 network",
    BAD_RULES: "The rules of AddSecurityGroupRule are not a list of rules",
}

RULE_TYPES = ("Ingress", "Egress")
PROTOCOLS = ("TCP", "UDP", "ICMP", "ALL")
MAX_RULES_PER_CALL = 100


def sg_error(code: str, details: str) -> ApiError:
    return ApiError(code, _DESCRIPTIONS[code], details)


# --- queries ---------------------------------------------------------------------------------


async def _group_extra(s: Tx, rows: Any, invs: list[dict[str, Any]]) -> None:
    uuids = [r.uuid for r in rows]
    rule_rows = (
        await s.execute(
            select(m.SecurityGroupRule)
            .where(m.SecurityGroupRule.securityGroupUuid.in_(uuids))
            .order_by(m.SecurityGroupRule.createDate, m.SecurityGroupRule.uuid)
        )
    ).scalars().all()
    rules: dict[str, list[dict[str, Any]]] = {}
    target = query.TARGETS["QueryObjectSecurityGroupRuleInventory"]
    for r, out in zip(rule_rows, await query.inventories(s, target, rule_rows), strict=True):
        rules.setdefault(r.securityGroupUuid, []).append(out)
    l3s: dict[str, list[str]] = {}
    for group, l3 in await s.execute(
        select(m.SecurityGroupL3NetworkRef.securityGroupUuid, m.SecurityGroupL3NetworkRef.l3NetworkUuid)
        .where(m.SecurityGroupL3NetworkRef.securityGroupUuid.in_(uuids))
        .order_by(m.SecurityGroupL3NetworkRef.createDate, m.SecurityGroupL3NetworkRef.uuid)
    ):
        l3s.setdefault(group, []).append(l3)
    for row, out in zip(rows, invs, strict=True):
        out["rules"] = rules.get(row.uuid, [])
        out["attachedL3NetworkUuids"] = l3s.get(row.uuid, [])


query.register(
    query.QueryTarget(
        "QueryObjectSecurityGroupInventory",
        m.SecurityGroup,
        "SecurityGroupInventory",
        scope="owned",
        extra=_group_extra,
        joins={"rules": query.Join("uuid", "QueryObjectSecurityGroupRuleInventory", "securityGroupUuid")},
    )
)
query.register(
    query.QueryTarget(
        "QueryObjectSecurityGroupRuleInventory",
        m.SecurityGroupRule,
        "SecurityGroupRuleInventory",
        scope="owned",
        owner_column="securityGroupUuid",  # a rule is its group's account's
        joins={"securityGroup": query.Join("securityGroupUuid", "QueryObjectSecurityGroupInventory", "uuid")},
    )
)
query.register(
    query.QueryTarget(
        "QueryObjectVmNicSecurityGroupRefInventory",
        m.VmNicSecurityGroupRef,
        "VmNicSecurityGroupRefInventory",
        scope="owned",
        owner_column="securityGroupUuid",
        joins={
            "securityGroup": query.Join("securityGroupUuid", "QueryObjectSecurityGroupInventory", "uuid"),
            "vmNic": query.Join("vmNicUuid", "QueryObjectVmNicInventory", "uuid"),
        },
    )
)
register_queries("QuerySecurityGroup", "QuerySecurityGroupRule", "QueryVmNicInSecurityGroup")


async def _inventory(s: Tx, uuid: str) -> dict[str, Any]:
    return await inv(s, "QueryObjectSecurityGroupInventory", await s.get(m.SecurityGroup, uuid))


# --- pushing with rollback -----------------------------------------------------------------


async def _write_then_push(ctx: ApiContext, nics: set[str], undo: Callable[[Tx], Awaitable[None]]) -> None:
    """After a committed change: push it; a host that fails undoes it everywhere."""
    try:
        await service.push_nics(ctx.p, nics)
    except ApiError:
        async with ctx.p.db.tx() as s:
            await undo(s)
        await _restore(ctx, nics)
        raise


async def _push_then_write(ctx: ApiContext, nics: set[str], ex: Excluded) -> None:
    """Before a removal: push the state without it; a host that fails puts every host back."""
    try:
        await service.push_nics(ctx.p, nics, ex)
    except ApiError:
        await _restore(ctx, nics)
        raise


async def _restore(ctx: ApiContext, nics: set[str]) -> None:
    try:
        await service.push_nics(ctx.p, nics)
    except ApiError as err:
        log.warning("security group rules not restored on every host: %s (ReconnectHost re-applies them)", err)


# --- groups ------------------------------------------------------------------------------------


@api("CreateSecurityGroup")
async def create_group(ctx: ApiContext) -> dict[str, Any]:
    name = ctx.req("name")
    if not name.strip():
        raise invalid("name must not be empty")
    # internalId: ZStack's short number of a group (its host-side names); one more than any. Two
    # management nodes may pick the same one at once: the unique index refuses the second, which
    # picks again
    for attempt in range(3):
        try:
            async with ctx.p.queues.serial("sg-internal-id"), ctx.p.db.tx() as s:
                last = (await s.execute(select(func.max(m.SecurityGroup.internalId)))).scalar()
                row = m.SecurityGroup(
                    uuid=new_uuid(ctx),
                    name=name,
                    description=ctx.str("description"),
                    state="Enabled",
                    internalId=int(last or 0) + 1,
                )
                s.add(row)
                await own(s, ctx, row.uuid, "SecurityGroupVO")
                await add_creation_tags(s, ctx, row.uuid, "SecurityGroupVO")
                await s.flush()
                out = {"inventory": await _inventory(s, row.uuid)}
            return out
        except IntegrityError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@api("UpdateSecurityGroup")
async def update_group(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.SecurityGroup, ctx.req("uuid"), ctx, "SecurityGroup", owned=True)
        update_fields(row, ctx)
        await s.flush()
        return {"inventory": await _inventory(s, row.uuid)}


@api("ChangeSecurityGroupState")
async def change_group_state(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.SecurityGroup, ctx.req("uuid"), ctx, "SecurityGroup", owned=True)
        new = state_event(ctx.req("stateEvent"), ENABLE_DISABLE)
        old, uuid = row.state, row.uuid
    async with ctx.p.queues.serial(f"sg-group:{uuid}"):
        async with ctx.p.db.tx() as s:
            nics = await service.members(s, {uuid})
        if new == old:
            pass
        elif new == "Disabled":
            await _push_then_write(ctx, nics, Excluded(groups=frozenset({uuid})))
            await _set_state(ctx, uuid, new)
        else:
            await _set_state(ctx, uuid, new)

            async def undo(s: Tx) -> None:
                (await s.get(m.SecurityGroup, uuid)).state = old

            await _write_then_push(ctx, nics, undo)
    async with ctx.p.db.tx() as s:
        return {"inventory": await _inventory(s, uuid)}


async def _set_state(ctx: ApiContext, uuid: str, state: str) -> None:
    async with ctx.p.db.tx() as s:
        (await s.get(m.SecurityGroup, uuid)).state = state


@api("DeleteSecurityGroup")
async def delete_group(ctx: ApiContext) -> dict[str, Any]:
    mode = ctx.str("deleteMode", "Permissive")
    if mode not in ("Permissive", "Enforcing"):
        raise invalid(f"deleteMode must be Permissive or Enforcing, got {mode!r}")
    async with ctx.p.db.tx() as s:
        uuid = (await load(s, m.SecurityGroup, ctx.req("uuid"), ctx, "SecurityGroup", owned=True)).uuid
    async with ctx.p.queues.serial(f"sg-group:{uuid}"):
        async with ctx.p.db.tx() as s:
            nics = await service.members(s, {uuid})
        await _push_then_write(ctx, nics, Excluded(groups=frozenset({uuid})))
        async with ctx.p.db.tx() as s:
            row = await s.get(m.SecurityGroup, uuid)
            if row is not None:
                for model in (m.SecurityGroupRule, m.SecurityGroupL3NetworkRef, m.VmNicSecurityGroupRef):
                    await s.execute(delete(model).where(model.securityGroupUuid == uuid))
                await s.delete(row)
                await disown(s, [uuid])
    return {}


# --- rules -------------------------------------------------------------------------------------


def _port(value: Any, name: str, where: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise sg_error(BAD_PORT_RANGE, f"{where}.{name} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise sg_error(BAD_PORT_RANGE, f"{where}.{name} must be an integer, got {value!r}") from None


def parse_rule(raw: Any, where: str) -> dict[str, Any]:
    """One rule of AddSecurityGroupRule, checked and in canonical form (ports as ints, the CIDR
    as its network), or the SG error saying what is wrong with it."""
    if not isinstance(raw, dict):
        raise sg_error(BAD_RULES, f"{where} must be an object with type, protocol, startPort, endPort, allowedCidr")
    rtype, protocol = raw.get("type"), raw.get("protocol")
    if rtype not in RULE_TYPES:
        raise sg_error(BAD_RULE_TYPE, f"{where}.type is {rtype!r}; valid: {', '.join(RULE_TYPES)}")
    if protocol not in PROTOCOLS:
        raise sg_error(BAD_PROTOCOL, f"{where}.protocol is {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    start, end = _port(raw.get("startPort"), "startPort", where), _port(raw.get("endPort"), "endPort", where)
    if protocol in ("TCP", "UDP"):
        if start is None or end is None:
            raise sg_error(BAD_PORT_RANGE, f"{where}: protocol {protocol} needs startPort and endPort (0-65535)")
        if start == -1 or end == -1:
            raise sg_error(PROTOCOL_PORT_MISMATCH, f"{where}: port -1 is for ICMP and ALL; {protocol} needs 0-65535")
        if not (0 <= start <= 65535 and 0 <= end <= 65535):
            raise sg_error(BAD_PORT_RANGE, f"{where}: ports {start}-{end} are outside 0-65535")
        if start > end:
            raise sg_error(BAD_PORT_RANGE, f"{where}: startPort {start} is greater than endPort {end}")
    elif protocol == "ICMP":  # startPort: the ICMP type, endPort: its code; -1: any
        start = -1 if start is None else start
        end = -1 if end is None else end
        if not (-1 <= start <= 255 and -1 <= end <= 255):
            raise sg_error(BAD_PORT_RANGE, f"{where}: ICMP type {start} and code {end} must be -1 (any) or 0-255")
        if start == -1 and end != -1:
            raise sg_error(PROTOCOL_PORT_MISMATCH, f"{where}: an ICMP code ({end}) needs an ICMP type (startPort)")
    else:
        if (start, end) not in ((None, None), (-1, -1), (None, -1), (-1, None)):
            raise sg_error(PROTOCOL_PORT_MISMATCH, f"{where}: protocol ALL covers every port; give no ports (or -1)")
        start, end = -1, -1
    cidr = raw.get("allowedCidr")
    if cidr is None or cidr == "":
        cidr = "0.0.0.0/0"
    if not isinstance(cidr, str) or "/" not in cidr:
        raise sg_error(BAD_CIDR, f"{where}.allowedCidr {cidr!r} is not an IPv4 CIDR (a.b.c.d/n)")
    try:
        net = ipaddress.IPv4Network(cidr.strip(), strict=False)
    except ValueError:
        raise sg_error(BAD_CIDR, f"{where}.allowedCidr {cidr!r} is not an IPv4 CIDR (a.b.c.d/n)") from None
    return {"type": rtype, "protocol": protocol, "startPort": start, "endPort": end, "allowedCidr": str(net)}


def _key(r: Any) -> tuple[Any, ...]:
    get = r.get if isinstance(r, dict) else lambda k: getattr(r, k)
    return tuple(get(k) for k in ("type", "protocol", "startPort", "endPort", "allowedCidr"))


def _rules_param(ctx: ApiContext) -> list[Any]:
    raw = ctx.params.get("rules")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise sg_error(BAD_RULES, "rules must be a JSON list of rule objects") from None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise sg_error(BAD_RULES, "rules must be a non-empty list of rule objects")
    if len(raw) > MAX_RULES_PER_CALL:
        raise sg_error(BAD_RULES, f"at most {MAX_RULES_PER_CALL} rules per call, got {len(raw)}")
    return raw


@api("AddSecurityGroupRule")
async def add_rules(ctx: ApiContext) -> dict[str, Any]:
    rules = [parse_rule(r, f"rules[{i}]") for i, r in enumerate(_rules_param(ctx))]
    async with ctx.p.db.tx() as s:
        uuid = (await load(s, m.SecurityGroup, ctx.req("securityGroupUuid"), ctx, "SecurityGroup", owned=True)).uuid
    async with ctx.p.queues.serial(f"sg-group:{uuid}"):
        async with ctx.p.db.tx() as s:
            have = {
                _key(r)
                for r in (
                    await s.execute(select(m.SecurityGroupRule).where(m.SecurityGroupRule.securityGroupUuid == uuid))
                ).scalars()
            }
            new_uuids = []
            for i, r in enumerate(rules):
                if _key(r) in have:
                    raise sg_error(DUPLICATE_RULE, f"rules[{i}] {_key(r)} is already a rule of security group {uuid}")
                have.add(_key(r))
                row = m.SecurityGroupRule(uuid=new_uuid(), securityGroupUuid=uuid, state="Enabled", **r)
                s.add(row)
                new_uuids.append(row.uuid)
            nics = await service.members(s, {uuid})

        async def undo(s: Tx) -> None:
            await s.execute(delete(m.SecurityGroupRule).where(m.SecurityGroupRule.uuid.in_(new_uuids)))

        await _write_then_push(ctx, nics, undo)
    async with ctx.p.db.tx() as s:
        return {"inventory": await _inventory(s, uuid)}


@api("DeleteSecurityGroupRule")
async def delete_rules(ctx: ApiContext) -> dict[str, Any]:
    wanted = [str(u) for u in ctx.list("ruleUuids")]
    if not wanted:
        raise invalid("ruleUuids must name at least one rule")
    async with ctx.p.db.tx() as s:
        stmt = select(m.SecurityGroupRule).where(m.SecurityGroupRule.uuid.in_(wanted))
        rows = (await s.execute(stmt)).scalars().all()
        found = {r.uuid: r.securityGroupUuid for r in rows}
        for u in wanted:
            if u not in found:
                raise not_found("SecurityGroupRule", u)
        groups = set(found.values())
        for g in sorted(groups):  # another account's rule is one that does not exist
            await load(s, m.SecurityGroup, g, ctx, "SecurityGroup", owned=True)
    for g in sorted(groups):
        mine = frozenset(u for u, grp in found.items() if grp == g)
        async with ctx.p.queues.serial(f"sg-group:{g}"):
            async with ctx.p.db.tx() as s:
                nics = await service.members(s, {g})
            await _push_then_write(ctx, nics, Excluded(rules=mine))
            async with ctx.p.db.tx() as s:
                await s.execute(delete(m.SecurityGroupRule).where(m.SecurityGroupRule.uuid.in_(mine)))
    async with ctx.p.db.tx() as s:
        return {"inventory": await _inventory(s, sorted(groups)[0])}


# --- L3 networks -------------------------------------------------------------------------------


@api("AttachSecurityGroupToL3Network")
async def attach_l3(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        group = await load(s, m.SecurityGroup, ctx.req("securityGroupUuid"), ctx, "SecurityGroup", owned=True)
        l3 = await load(s, m.L3Network, ctx.req("l3NetworkUuid"), ctx, "L3Network")
        if await providers.attached_type(s, l3.uuid, service.SERVICE) != service.PROVIDER_TYPE:
            raise sg_error(
                L3_WITHOUT_SERVICE,
                f"L3 network {l3.uuid} has no SecurityGroup service; attach it with AttachNetworkServiceToL3Network "
                "from the SecurityGroup provider",
            )
        exists = (
            await s.execute(
                select(m.SecurityGroupL3NetworkRef.uuid).where(
                    m.SecurityGroupL3NetworkRef.securityGroupUuid == group.uuid,
                    m.SecurityGroupL3NetworkRef.l3NetworkUuid == l3.uuid,
                )
            )
        ).first()
        if exists:
            raise sg_error(ALREADY_ATTACHED, f"security group {group.uuid} is already attached to L3 network {l3.uuid}")
        s.add(m.SecurityGroupL3NetworkRef(uuid=new_uuid(), securityGroupUuid=group.uuid, l3NetworkUuid=l3.uuid))
        await s.flush()
        # no NIC of the L3 is in the group yet: nothing for a host to change
        return {"inventory": await _inventory(s, group.uuid)}


@api("DetachSecurityGroupFromL3Network")
async def detach_l3(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        group = await load(s, m.SecurityGroup, ctx.req("securityGroupUuid"), ctx, "SecurityGroup", owned=True)
        l3_uuid = ctx.req("l3NetworkUuid")
        ref = (
            await s.execute(
                select(m.SecurityGroupL3NetworkRef.uuid).where(
                    m.SecurityGroupL3NetworkRef.securityGroupUuid == group.uuid,
                    m.SecurityGroupL3NetworkRef.l3NetworkUuid == l3_uuid,
                )
            )
        ).first()
        if ref is None:
            raise sg_error(NOT_ATTACHED, f"security group {group.uuid} is not attached to L3 network {l3_uuid}")
        uuid = group.uuid
    async with ctx.p.queues.serial(f"sg-group:{uuid}"):
        async with ctx.p.db.tx() as s:
            nics = await service.members(s, {uuid}, l3_uuid)
        # the group's NICs on that L3 leave it (ZStack's rule): they are filtered by their other groups only
        await _push_then_write(ctx, nics, Excluded(refs=frozenset((n, uuid) for n in nics)))
        async with ctx.p.db.tx() as s:
            await s.execute(
                delete(m.VmNicSecurityGroupRef).where(
                    m.VmNicSecurityGroupRef.securityGroupUuid == uuid, m.VmNicSecurityGroupRef.vmNicUuid.in_(nics)
                )
            )
            await s.execute(
                delete(m.SecurityGroupL3NetworkRef).where(
                    m.SecurityGroupL3NetworkRef.securityGroupUuid == uuid,
                    m.SecurityGroupL3NetworkRef.l3NetworkUuid == l3_uuid,
                )
            )
    async with ctx.p.db.tx() as s:
        return {"inventory": await _inventory(s, uuid)}


# --- VM NICs -----------------------------------------------------------------------------------


def _nic_uuids(ctx: ApiContext) -> list[str]:
    nics = [str(u).strip() for u in ctx.list("vmNicUuids")]
    if not nics or not all(nics):
        raise invalid("vmNicUuids must name at least one VM NIC")
    return list(dict.fromkeys(nics))


@api("AddVmNicToSecurityGroup")
async def add_nics(ctx: ApiContext) -> dict[str, Any]:
    nic_uuids = _nic_uuids(ctx)
    async with ctx.p.db.tx() as s:
        uuid = (await load(s, m.SecurityGroup, ctx.req("securityGroupUuid"), ctx, "SecurityGroup", owned=True)).uuid
    async with ctx.p.queues.serial(f"sg-group:{uuid}"):
        async with ctx.p.db.tx() as s:
            attached = set(
                (
                    await s.execute(
                        select(m.SecurityGroupL3NetworkRef.l3NetworkUuid).where(
                            m.SecurityGroupL3NetworkRef.securityGroupUuid == uuid
                        )
                    )
                ).scalars()
            )
            already = await service.members(s, {uuid})
            added: list[str] = []
            for n in nic_uuids:
                nic = await load(s, m.VmNic, n, ctx, "VmNic")
                await load(s, m.VmInstance, nic.vmInstanceUuid, ctx, "VmNic", owned=True)
                if nic.l3NetworkUuid not in attached:
                    raise sg_error(
                        NIC_NOT_ON_ATTACHED_L3,
                        f"VM NIC {nic.uuid} is on L3 network {nic.l3NetworkUuid}, which security group {uuid} "
                        "is not attached to (AttachSecurityGroupToL3Network)",
                    )
                if nic.uuid in already:
                    continue
                s.add(
                    m.VmNicSecurityGroupRef(
                        uuid=new_uuid(), vmNicUuid=nic.uuid, securityGroupUuid=uuid, vmInstanceUuid=nic.vmInstanceUuid
                    )
                )
                added.append(nic.uuid)

        async def undo(s: Tx) -> None:
            await s.execute(
                delete(m.VmNicSecurityGroupRef).where(
                    m.VmNicSecurityGroupRef.securityGroupUuid == uuid, m.VmNicSecurityGroupRef.vmNicUuid.in_(added)
                )
            )

        await _write_then_push(ctx, set(added), undo)
    return {}


@api("DeleteVmNicFromSecurityGroup")
async def delete_nics(ctx: ApiContext) -> dict[str, Any]:
    nic_uuids = _nic_uuids(ctx)
    async with ctx.p.db.tx() as s:
        uuid = (await load(s, m.SecurityGroup, ctx.req("securityGroupUuid"), ctx, "SecurityGroup", owned=True)).uuid
    async with ctx.p.queues.serial(f"sg-group:{uuid}"):
        async with ctx.p.db.tx() as s:
            nics = await service.members(s, {uuid}) & set(nic_uuids)
        await _push_then_write(ctx, nics, Excluded(refs=frozenset((n, uuid) for n in nics)))
        async with ctx.p.db.tx() as s:
            await s.execute(
                delete(m.VmNicSecurityGroupRef).where(
                    m.VmNicSecurityGroupRef.securityGroupUuid == uuid, m.VmNicSecurityGroupRef.vmNicUuid.in_(nics)
                )
            )
    return {}


@api("GetCandidateVmNicForSecurityGroup")
async def candidate_nics(ctx: ApiContext) -> dict[str, Any]:
    """The caller's VM NICs that could join the group: on its L3 networks, not in it yet."""
    async with ctx.p.db.tx() as s:
        uuid = (await load(s, m.SecurityGroup, ctx.req("securityGroupUuid"), ctx, "SecurityGroup", owned=True)).uuid
        attached = select(m.SecurityGroupL3NetworkRef.l3NetworkUuid).where(
            m.SecurityGroupL3NetworkRef.securityGroupUuid == uuid
        )
        inside = select(m.VmNicSecurityGroupRef.vmNicUuid).where(m.VmNicSecurityGroupRef.securityGroupUuid == uuid)
        stmt = (
            select(m.VmNic)
            .join(m.VmInstance, m.VmInstance.uuid == m.VmNic.vmInstanceUuid)
            .where(
                m.VmNic.l3NetworkUuid.in_(attached),
                m.VmNic.uuid.not_in(inside),
                m.VmInstance.type == "UserVm",
                m.VmInstance.state.not_in(("Destroyed", "Destroying", "Expunging")),
            )
            .order_by(m.VmNic.createDate, m.VmNic.uuid)
        )
        if not ctx.caller.is_admin:
            mine = select(m.AccountResourceRef.resourceUuid).where(
                m.AccountResourceRef.accountUuid == ctx.caller.account_uuid
            )
            stmt = stmt.where(m.VmInstance.uuid.in_(mine))
        nics = (await s.execute(stmt)).scalars().all()
        return {"inventories": [await inv(s, "QueryObjectVmNicInventory", n) for n in nics]}
