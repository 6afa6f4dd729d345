"""The garbage collector (release 1.2 §4): host-side work that a user operation could not finish
because the host's agent was unreachable — destroy a domain, delete a volume or image file — is
stored in the ``garbage_collector`` table and re-run when the host reconnects (a CONNECT_HOOK of
compute/host.py) or by the periodic poll (global config ``gc/interval``), until it is done.

The user's operation succeeds at once; the database is the only state, so pending work survives
a management node restart. ``GET /gc`` on the management node lists the entries (admin session).

``hostUuid`` names the agent to call: a host, or a backup storage kept by an agent (its commands
carry the backup storage's uuid as ``hostUuid`` already)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, or_, select

from nimbostack.core import hooks
from nimbostack.core.errors import HOST_DISCONNECTED, ApiError
from nimbostack.core.query import fmt_date
from nimbostack.db import models as m
from nimbostack.db.engine import Tx

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

PENDING, DONE = "Pending", "Done"
CALL_TIMEOUT = 60.0  # seconds one re-run agent call may take outside any API
KEEP_DONE = timedelta(days=7)  # Done entries stay queryable this long
TICK = 1.0

# Work that became pointless since it was deferred is marked Done without calling the agent.
# A check answers a reason to skip, or None to run the entry.
Check = Callable[[Tx, m.GarbageCollector, dict[str, Any]], Awaitable[str | None]]
CHECKS: dict[str, Check] = {}

DESTROY_VM = "destroy-vm"
DELETE_VOLUME_FILE = "delete-volume-file"
DELETE_IMAGE_FILE = "delete-image-file"


def check(name: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        CHECKS[name] = fn
        return fn

    return register


_GOING = ("Destroying", "Destroyed", "Expunging")


@check(DESTROY_VM)
async def _vm_back_on_host(s: Tx, gc: m.GarbageCollector, body: dict[str, Any]) -> str | None:
    vm = await s.get(m.VmInstance, gc.resourceUuid) if gc.resourceUuid else None
    # Destroying: the destroy that deferred this entry has not marked the VM Destroyed yet (a poll
    # of the GC can come in between); the domain must still go
    if vm is not None and vm.state not in _GOING and vm.hostUuid == gc.hostUuid:
        return f"VM {vm.uuid} was recovered and runs on host {gc.hostUuid} again; its domain stays"
    return None


@check(DELETE_VOLUME_FILE)
async def _volume_file_in_use(s: Tx, gc: m.GarbageCollector, body: dict[str, Any]) -> str | None:
    # the same path on another host's local storage is another file (a migrated volume's old copy)
    path = body.get("installPath")
    here = or_(m.Volume.hostUuid == gc.hostUuid, m.Volume.hostUuid.is_(None))
    used = (await s.execute(select(m.Volume.uuid).where(m.Volume.installPath == path, here))).first()
    if used:
        return f"volume {used[0]} uses {path} again"
    snap = (
        await s.execute(
            select(m.VolumeSnapshot.uuid)
            .join(m.Volume, m.Volume.uuid == m.VolumeSnapshot.volumeUuid)
            .where(m.VolumeSnapshot.primaryStorageInstallPath == path, here)
        )
    ).first()
    return f"snapshot {snap[0]} uses {path} again" if snap else None


@check(DELETE_IMAGE_FILE)
async def _image_file_in_use(s: Tx, gc: m.GarbageCollector, body: dict[str, Any]) -> str | None:
    used = (
        await s.execute(
            select(m.ImageBackupStorageRef.imageUuid).where(
                m.ImageBackupStorageRef.installPath == body.get("installPath"),
                m.ImageBackupStorageRef.backupStorageUuid == gc.hostUuid,
            )
        )
    ).first()
    return f"image {used[0]} uses {body.get('installPath')} again" if used else None


def unreachable(err: BaseException) -> bool:
    """The agent could not be reached (or the host is not Connected): work for the GC."""
    return isinstance(err, ApiError) and err.code == HOST_DISCONNECTED


async def _target(s: Tx, host_uuid: str) -> tuple[str, str] | None:
    """(agent URL, status) of a host or an agent-kept backup storage; None when it is gone."""
    host = await s.get(m.Host, host_uuid)
    if host is not None:
        return host.agentUrl, host.status
    bs = await s.get(m.BackupStorage, host_uuid)
    if bs is not None and bs.agentUrl:
        return bs.agentUrl, "Connected"
    return None


async def call(
    p: Platform, host_uuid: str, path: str, body: dict[str, Any], timeout: float | None = None
) -> dict[str, Any]:
    async with p.db.tx() as s:
        target = await _target(s, host_uuid)
    if target is None:
        raise ApiError(HOST_DISCONNECTED, "The agent is gone", f"host or backup storage {host_uuid} no longer exists")
    url, status = target
    if status != "Connected":
        raise ApiError(HOST_DISCONNECTED, "The host is not connected", f"host {host_uuid} is {status}")
    return await p.agents.call(url, path, {"hostUuid": host_uuid, **body}, timeout=timeout)


async def submit(
    p: Platform,
    name: str,
    host_uuid: str,
    path: str,
    body: dict[str, Any],
    reason: str,
    resource_uuid: str | None = None,
) -> str:
    """Store host-side work for later; returns the entry's uuid."""
    uuid = uuidlib.uuid4().hex
    async with p.db.tx() as s:
        s.add(
            m.GarbageCollector(
                uuid=uuid,
                name=name,
                hostUuid=host_uuid,
                resourceUuid=resource_uuid,
                path=path,
                body=json.dumps(body),
                status=PENDING,
                reason=reason,
                attempts=0,
            )
        )
    log.info("GC %s: %s %s on %s deferred: %s", uuid, name, path, host_uuid, reason)
    return uuid


async def call_or_defer(
    p: Platform,
    name: str,
    host_uuid: str,
    path: str,
    body: dict[str, Any],
    resource_uuid: str | None = None,
) -> bool:
    """Run an agent command now, or — if the agent cannot be reached — leave it to the GC.
    True when it ran now. Other agent failures are raised as usual."""
    try:
        await call(p, host_uuid, path, body)
        return True
    except ApiError as err:
        if not unreachable(err):
            raise
        async with p.db.tx() as s:
            gone = await _target(s, host_uuid) is None
        if gone:  # a deleted host leaves nothing to clean
            return False
        await submit(p, name, host_uuid, path, body, f"{err.description}: {err.details}", resource_uuid)
        return False


async def run(p: Platform, host_uuid: str | None = None) -> int:
    """Re-run the pending entries (of one host, or of every Connected agent); returns how many
    finished. Entries of one host run in the order they were made."""
    async with p.db.tx() as s:
        stmt = select(m.GarbageCollector.hostUuid).where(m.GarbageCollector.status == PENDING).distinct()
        if host_uuid:
            stmt = stmt.where(m.GarbageCollector.hostUuid == host_uuid)
        hosts = list((await s.execute(stmt)).scalars())
    done = 0
    for h in hosts:
        async with p.queues.serial(f"gc:{h}"):
            done += await _run_host(p, h)
    return done


async def _finish(p: Platform, uuid: str, status: str, reason: str | None, attempted: bool) -> None:
    async with p.db.tx() as s:
        row = await s.get(m.GarbageCollector, uuid)
        if row is None:
            return
        row.status = status
        if reason is not None:
            row.reason = reason
        if attempted:
            row.attempts += 1
        row.lastOpDate = datetime.utcnow()


async def _run_host(p: Platform, host_uuid: str) -> int:
    async with p.db.tx() as s:
        target = await _target(s, host_uuid)
        entries = (
            (
                await s.execute(
                    select(m.GarbageCollector)
                    .where(m.GarbageCollector.hostUuid == host_uuid, m.GarbageCollector.status == PENDING)
                    .order_by(m.GarbageCollector.createDate, m.GarbageCollector.uuid)
                )
            )
            .scalars()
            .all()
        )
        skips: dict[str, str | None] = {}
        for gc in entries:
            fn = CHECKS.get(gc.name)
            skips[gc.uuid] = await fn(s, gc, json.loads(gc.body)) if fn and target is not None else None
    done = 0
    for gc in entries:
        if target is None:
            await _finish(p, gc.uuid, DONE, f"host {host_uuid} was deleted; nothing is left to clean", False)
            done += 1
            continue
        if target[1] != "Connected":
            break  # the reconnect hook runs them
        if skips[gc.uuid]:
            await _finish(p, gc.uuid, DONE, f"not needed any more: {skips[gc.uuid]}", False)
            done += 1
            continue
        try:
            await call(p, host_uuid, gc.path, json.loads(gc.body), timeout=CALL_TIMEOUT)
        except ApiError as err:
            await _finish(p, gc.uuid, PENDING, f"{err.description}: {err.details}", True)
            if unreachable(err):
                break  # the rest would fail the same way
            log.warning("GC %s: %s on %s failed: %s", gc.uuid, gc.path, host_uuid, err)
            continue
        await _finish(p, gc.uuid, DONE, None, True)
        log.info("GC %s: %s %s on %s done", gc.uuid, gc.name, gc.path, host_uuid)
        done += 1
    return done


async def on_host_connect(p: Platform, host_uuid: str) -> None:
    """A CONNECT_HOOK: the host answers again, so finish what waited for it."""
    try:
        await run(p, host_uuid)
    except Exception:  # never fail a reconnect for the GC; the poll tries again
        log.exception("GC run for host %s failed", host_uuid)


async def prune(p: Platform) -> None:
    async with p.db.tx() as s:
        await s.execute(
            delete(m.GarbageCollector).where(
                m.GarbageCollector.status == DONE, m.GarbageCollector.lastOpDate < datetime.utcnow() - KEEP_DONE
            )
        )


async def gc_loop(p: Platform) -> None:
    """The time-based trigger: every ``gc/interval`` seconds (re-read every second, so a
    changed interval takes effect at once)."""
    last = time.monotonic()
    while True:
        try:
            await asyncio.sleep(TICK)
            if time.monotonic() - last < await p.config.get("gc", "interval"):
                continue
            last = time.monotonic()
            await run(p)
            await prune(p)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("GC round failed")


async def entries(
    p: Platform, status: str | None = None, host_uuid: str | None = None, resource_uuid: str | None = None
) -> list[dict[str, Any]]:
    """The entries as JSON inventories, newest first (for ``GET /gc``)."""
    stmt = select(m.GarbageCollector).order_by(m.GarbageCollector.createDate.desc())
    if status:
        stmt = stmt.where(m.GarbageCollector.status == status)
    if host_uuid:
        stmt = stmt.where(m.GarbageCollector.hostUuid == host_uuid)
    if resource_uuid:
        stmt = stmt.where(m.GarbageCollector.resourceUuid == resource_uuid)
    async with p.db.tx() as s:
        rows = (await s.execute(stmt.limit(1000))).scalars().all()
    return [
        {
            "uuid": r.uuid,
            "name": r.name,
            "hostUuid": r.hostUuid,
            "resourceUuid": r.resourceUuid,
            "path": r.path,
            "body": json.loads(r.body),
            "status": r.status,
            "reason": r.reason,
            "attempts": r.attempts,
            "createDate": fmt_date(r.createDate),
            "lastOpDate": fmt_date(r.lastOpDate),
        }
        for r in rows
    ]


hooks.on_host_connect(on_host_connect, first=True)
