"""IP address management: an IP belongs to at most one NIC, guarded by a unique constraint."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

from sqlalchemy import Row, bindparam, delete, exists, insert, select

from nimbostack.core.errors import IP_ALLOCATION_FAILED, ApiError, invalid
from nimbostack.core.resources import new_uuid
from nimbostack.db import models as m
from nimbostack.db.engine import Tx, columns, insert_now, rowcount, table_of

PROBES = 16

# built once (db/engine.py, "Statements built once"): every VM create allocates
_RANGES = select(*columns(m.IpRange)).where(m.IpRange.l3NetworkUuid == bindparam("l3"))
_TAKEN = select(m.UsedIp.uuid).where(m.UsedIp.l3NetworkUuid == bindparam("l3"), m.UsedIp.ipInLong == bindparam("ip"))
# a probe and its use in one statement: the row is inserted only if the address is free (the
# unique constraint still guards against a concurrent writer on PostgreSQL)
_USE_COLUMNS = ("uuid", "ipRangeUuid", "l3NetworkUuid", "ip", "ipInLong", "netmask", "gateway", "usedFor")
# of the Table, not the class: a Core INSERT on either database (the ORM's would take the
# columns' names for its own bulk insert)
_USE_IF_FREE = insert(table_of(m.UsedIp)).from_select(
    list(_USE_COLUMNS),
    select(*(bindparam(c, type_=getattr(m.UsedIp, c).type) for c in _USE_COLUMNS)).where(
        ~exists().where(
            m.UsedIp.l3NetworkUuid == bindparam("l3NetworkUuid"), m.UsedIp.ipInLong == bindparam("ipInLong")
        )
    ),
)


async def allocate(s: Tx, l3_uuid: str, wanted: str | None = None, used_for: str = "VmNic") -> m.UsedIp:
    """Take a free IP of the L3 network (``wanted`` if given) inside the caller's transaction, for
    ``used_for`` (a VM's NIC, a VIP, a DHCP server). The row is inserted at once (``insert_now``).

    Random probes find a free address in O(1) queries while the network is not nearly full;
    an indexed gap search covers the rest."""
    ranges = (await s.execute(_RANGES, {"l3": l3_uuid})).all()
    if not ranges:
        raise ApiError(IP_ALLOCATION_FAILED, "No IP range", f"L3 network {l3_uuid} has no IP range")
    if wanted:
        try:
            ip = int(ipaddress.IPv4Address(wanted))
        except ValueError:
            raise invalid(f"{wanted!r} is not an IPv4 address") from None
        for r in ranges:
            if int(ipaddress.IPv4Address(r.startIp)) <= ip <= int(ipaddress.IPv4Address(r.endIp)):
                if await _taken(s, l3_uuid, ip):
                    raise ApiError(IP_ALLOCATION_FAILED, "IP in use", f"{wanted} is already used on L3 {l3_uuid}")
                return await _use(s, r, ip, used_for)
        raise invalid(f"{wanted} is in no IP range of L3 network {l3_uuid}")
    order = list(ranges)
    random.shuffle(order)
    for r in order:
        lo, hi = int(ipaddress.IPv4Address(r.startIp)), int(ipaddress.IPv4Address(r.endIp))
        gw = int(ipaddress.IPv4Address(r.gateway))
        for _ in range(min(PROBES, hi - lo + 1)):
            ip = random.randint(lo, hi)
            if ip != gw and (row := await _use_if_free(s, r, ip, used_for)) is not None:
                return row
        used = set(
            (
                await s.execute(
                    select(m.UsedIp.ipInLong).where(
                        m.UsedIp.l3NetworkUuid == l3_uuid, m.UsedIp.ipInLong >= lo, m.UsedIp.ipInLong <= hi
                    )
                )
            ).scalars()
        )
        for ip in range(lo, hi + 1):
            if ip not in used and ip != gw:
                return await _use(s, r, ip, used_for)
    raise ApiError(IP_ALLOCATION_FAILED, "No free IP", f"every IP of L3 network {l3_uuid} is in use")


async def _taken(s: Tx, l3_uuid: str, ip: int) -> bool:
    return (await s.execute(_TAKEN, {"l3": l3_uuid, "ip": ip})).first() is not None


def _used(r: Row[Any], ip: int, used_for: str) -> m.UsedIp:
    return m.UsedIp(
        uuid=new_uuid(),
        ipRangeUuid=r.uuid,
        l3NetworkUuid=r.l3NetworkUuid,
        ip=str(ipaddress.IPv4Address(ip)),
        ipInLong=ip,
        netmask=r.netmask,
        gateway=r.gateway,
        usedFor=used_for,
    )


async def _use(s: Tx, r: Row[Any], ip: int, used_for: str) -> m.UsedIp:
    row = _used(r, ip, used_for)
    await insert_now(s, row)
    return row


async def _use_if_free(s: Tx, r: Row[Any], ip: int, used_for: str) -> m.UsedIp | None:
    """The address's row, inserted, or None when another NIC holds it."""
    row = _used(r, ip, used_for)
    done = await s.execute(_USE_IF_FREE, {c: getattr(row, c) for c in _USE_COLUMNS})
    return row if rowcount(done) == 1 else None


async def release(s: Tx, used_ip_uuids: list[str]) -> None:
    if used_ip_uuids:
        await s.execute(delete(m.UsedIp).where(m.UsedIp.uuid.in_(used_ip_uuids)))
