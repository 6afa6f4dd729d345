"""Per-account quotas (ZStack's names and defaults): how much of each a normal account holds, and
the check a creation passes before it runs. The admin account has no quotas.

The check runs in dispatch, by API name, before the call's handler (and its job): a creation that
would take an account past a limit is refused with QUOTA_EXCEEDED and nothing is made. Two
creations racing each other may both pass the check; the limit is then exceeded by at most the
calls in flight, as in ZStack."""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import ColumnElement, func, select

from nimbostack.core.errors import QUOTA_EXCEEDED, ApiError
from nimbostack.db.engine import Tx
from nimbostack.db.models import (
    AccountResourceRef,
    DiskOffering,
    Eip,
    Image,
    InstanceOffering,
    L3Network,
    Quota,
    Vip,
    VmInstance,
    Volume,
)

# ZStack 1.2's quota names and their defaults for a new normal account
DEFAULTS: dict[str, int] = {
    "vm.num": 20,
    "vm.cpuNum": 80,
    "vm.memorySize": 80 << 30,
    "volume.data.num": 40,
    "volume.capacity": 10 << 40,
    "l3.num": 20,
    "securityGroup.num": 20,
    "vip.num": 20,
    "eip.num": 20,
    "portForwarding.num": 20,
}

Usage = Callable[[Tx, str], Awaitable[int]]
# name -> how much of it an account holds; a family whose resources the project does not make
# yet (security groups, port forwarding) registers its own when it does
USAGE: dict[str, Usage] = {}
# API name -> what a call asks for: {quota name: amount}
Ask = Callable[[Tx, dict[str, Any]], Awaitable[dict[str, int]]]
ASKS: dict[str, Ask] = {}


def owned(account_uuid: str, column: Any) -> ColumnElement[bool]:
    return column.in_(select(AccountResourceRef.resourceUuid).where(AccountResourceRef.accountUuid == account_uuid))


def _counter(model: Any, value: Any, *where: Any) -> Usage:
    async def used(s: Tx, account_uuid: str) -> int:
        stmt = select(func.coalesce(value, 0)).select_from(model).where(owned(account_uuid, model.uuid), *where)
        return int((await s.execute(stmt)).scalar_one())

    return used


_LIVE_VM = VmInstance.state != "Destroyed"
_LIVE_VOLUME = Volume.status != "Deleted"
USAGE.update(
    {
        "vm.num": _counter(VmInstance, func.count(), _LIVE_VM),
        "vm.cpuNum": _counter(VmInstance, func.sum(VmInstance.cpuNum), _LIVE_VM),
        "vm.memorySize": _counter(VmInstance, func.sum(VmInstance.memorySize), _LIVE_VM),
        "volume.data.num": _counter(Volume, func.count(), Volume.type == "Data", _LIVE_VOLUME),
        "volume.capacity": _counter(Volume, func.sum(Volume.size), _LIVE_VOLUME),
        "l3.num": _counter(L3Network, func.count()),
        "vip.num": _counter(Vip, func.count()),
        "eip.num": _counter(Eip, func.count()),
    }
)


async def _size(s: Tx, model: Any, column: Any, uuid: Any) -> int:
    if not isinstance(uuid, str) or not uuid:
        return 0
    value = (await s.execute(select(column).where(model.uuid == uuid))).scalar_one_or_none()
    return int(value or 0)


def _uuids(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


async def _ask_vm(s: Tx, params: dict[str, Any]) -> dict[str, int]:
    offering = params.get("instanceOfferingUuid")
    cpu = await _size(s, InstanceOffering, InstanceOffering.cpuNum, offering)
    memory = await _size(s, InstanceOffering, InstanceOffering.memorySize, offering)
    data = _uuids(params.get("dataDiskOfferingUuids"))
    root = await _size(s, DiskOffering, DiskOffering.diskSize, params.get("rootDiskOfferingUuid"))
    root = root or await _size(s, Image, Image.size, params.get("imageUuid"))
    disks = [await _size(s, DiskOffering, DiskOffering.diskSize, u) for u in data]
    return {
        "vm.num": 1,
        "vm.cpuNum": cpu,
        "vm.memorySize": memory,
        "volume.data.num": len(data),
        "volume.capacity": root + sum(disks),
    }


async def _ask_recover_vm(s: Tx, params: dict[str, Any]) -> dict[str, int]:
    uuid = params.get("uuid")
    if not isinstance(uuid, str):
        return {}
    vm = select(VmInstance.cpuNum, VmInstance.memorySize, VmInstance.state).where(VmInstance.uuid == uuid)
    row = (await s.execute(vm)).one_or_none()
    if row is None or row.state != "Destroyed":
        return {}
    return {"vm.num": 1, "vm.cpuNum": row.cpuNum, "vm.memorySize": row.memorySize}


async def _ask_volume(s: Tx, params: dict[str, Any]) -> dict[str, int]:
    size = await _size(s, DiskOffering, DiskOffering.diskSize, params.get("diskOfferingUuid"))
    return {"volume.data.num": 1, "volume.capacity": size}


def _one(name: str) -> Ask:
    async def ask(s: Tx, params: dict[str, Any]) -> dict[str, int]:
        return {name: 1}

    return ask


ASKS.update(
    {
        "CreateVmInstance": _ask_vm,
        "RecoverVmInstance": _ask_recover_vm,
        "CreateDataVolume": _ask_volume,
        "CreateL3Network": _one("l3.num"),
        "CreateVip": _one("vip.num"),
        "CreateEip": _one("eip.num"),
        "CreateSecurityGroup": _one("securityGroup.num"),
        "CreatePortForwardingRule": _one("portForwarding.num"),
    }
)


async def limits(s: Tx, account_uuid: str) -> dict[str, int]:
    """The account's quotas: its stored values over the defaults."""
    rows = (await s.execute(select(Quota.name, Quota.value).where(Quota.identityUuid == account_uuid))).all()
    return {**DEFAULTS, **{name: int(value) for name, value in rows}}


async def used(s: Tx, account_uuid: str, name: str) -> int:
    usage = USAGE.get(name)
    return await usage(s, account_uuid) if usage is not None else 0


def default_rows(account_uuid: str) -> list[Quota]:
    """A new normal account's quotas."""
    return [
        Quota(uuid=uuidlib.uuid4().hex, name=n, identityUuid=account_uuid, identityType="AccountVO", value=v)
        for n, v in DEFAULTS.items()
    ]


async def check(s: Tx, account_uuid: str, api_name: str, params: dict[str, Any]) -> None:
    """Refuse with QUOTA_EXCEEDED a call that would take the account past one of its quotas."""
    ask = ASKS.get(api_name)
    if ask is None:
        return
    wanted = {n: v for n, v in (await ask(s, params)).items() if v > 0 and n in USAGE}
    if not wanted:
        return
    limit = await limits(s, account_uuid)
    for name, amount in wanted.items():
        have = await used(s, account_uuid, name)
        if have + amount > limit[name]:
            raise ApiError(
                QUOTA_EXCEEDED,
                "Quota exceeded",
                f"{api_name} needs {amount} of quota {name}; the account holds {have} of {limit[name]} "
                f"(an admin raises it with UpdateQuota identityUuid={account_uuid} name={name} value=...)",
            )
