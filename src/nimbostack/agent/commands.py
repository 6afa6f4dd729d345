"""The agent's own commands: /host/*, /vm/*, /storage/{local,smp}/* and /bs/*."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from nimbostack.agent import guard
from nimbostack.agent.backup import virtual_size
from nimbostack.agent.bridge import ensure_bridge
from nimbostack.agent.driver import DriverError
from nimbostack.agent.host import COMMANDS, START_STEPS, Agent, command, storage_command
from nimbostack.agent.storage import LocalStorage, PullFile
from nimbostack.wire import VERSION, DiskSpec, NicSpec, VmSpec
from nimbostack.wire.pki import CredentialsError
from nimbostack.wire.urls import FetchPolicy

log = logging.getLogger(__name__)


def _vm_spec(a: Agent, raw: dict[str, Any]) -> VmSpec:
    raw = dict(raw)
    raw["disks"] = [_disk(a, d) for d in raw.get("disks", [])]
    raw["nics"] = [NicSpec(**n) for n in raw.get("nics", [])]
    if raw.get("iso_path"):
        raw["iso_path"] = a.real(raw["iso_path"])
    return VmSpec(**raw)


def _disk(a: Agent, raw: dict[str, Any]) -> DiskSpec:
    disk = DiskSpec(**raw)
    disk.path = a.real(disk.path)
    return disk


@command("/host/connect")
async def _connect(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    # the version: the node redeploys an agent of another release (compute/deploy.py)
    return {**await a.connect(b["hostUuid"], b), "version": VERSION}


@command("/host/credentials")
async def _credentials(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    """New credentials from the management node (ReconnectHost rotates them): kept only when the
    same CA signed them for the same agent, then used for every new connection at once."""
    try:
        a.install_credentials(str(b["bundle"]).encode())
    except CredentialsError as err:
        raise DriverError("AGENT_BAD_CREDENTIALS", "the credentials were refused", str(err)) from None
    return {"notAfter": a.credentials.not_after.isoformat()}


@command("/host/ping")
async def _ping(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    key = b["hostUuid"] if a.multi_host else "local"
    # "connected": false tells the management node this agent restarted and needs /host/connect
    return {"connected": key in a.drivers, "version": VERSION}


@command("/host/ping-batch")
async def _ping_batch(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    """The pings of every host this agent serves that the node names (``hostUuids``), in one
    request: the simulator serves thousands. A host that cannot answer (a simulated fault), or
    not within ``timeout`` seconds, is left out: the node counts it as a lost ping."""
    uuids = b["hostUuids"]
    if not isinstance(uuids, list) or not all(isinstance(u, str) for u in uuids):
        raise ValueError("hostUuids must be a list of host uuids")
    timeout = float(b.get("timeout") or 5)

    async def one(uuid: str) -> bool:
        return await guard.host_answers(a, uuid, "/host/ping")

    answers: dict[str, dict[str, bool]] = {}
    if a.multi_host and guard.faults(a):
        # only with faults set (tests): each host's may delay or drop its answer
        done = await asyncio.gather(*(asyncio.wait_for(one(u), timeout * 0.9) for u in uuids), return_exceptions=True)
        alive = [u for u, ok in zip(uuids, done, strict=True) if ok is True]
    else:
        alive = list(uuids)
    for uuid in alive:
        answers[uuid] = {"connected": (uuid if a.multi_host else "local") in a.drivers}
    return {"hosts": answers}


async def _bridges(a: Agent, vm_uuid: str, nics: list[NicSpec]) -> list[str]:
    """The L2 bridges the NICs join (libvirt does not create them); warnings are logged."""
    warnings: list[str] = []
    if not a.multi_host:  # simulated hosts have no bridges
        for nic in nics:
            warnings += await ensure_bridge(nic.bridge, nic.physical_interface, nic.vlan)
    for w in warnings:
        log.warning("VM %s: %s", vm_uuid, w)
    return warnings


async def _plug(a: Agent, spec: VmSpec) -> list[str]:
    """What a VM needs on this host besides its domain: its L2 bridges, a console log."""
    warnings = await _bridges(a, spec.uuid, spec.nics)
    if not a.multi_host and a.console_dir:
        Path(a.console_dir).mkdir(parents=True, exist_ok=True)
        spec.console_log = spec.console_log or str(Path(a.console_dir) / f"{spec.uuid}.log")
    return warnings


@command("/vm/start")
async def _start(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    """``before``: [{path, body}] commands of the node's plugins (START_STEPS) to run first, in
    order; the first that fails fails the start, with no domain started."""
    spec = _vm_spec(a, b["vm"])
    steps = b.get("before") or []
    if not isinstance(steps, list):
        raise ValueError("before must be a list of {path, body}")
    for step in steps:
        if not isinstance(step, dict) or not isinstance(step.get("body"), dict):
            raise ValueError("before must be a list of {path, body}")
        if step.get("path") not in START_STEPS:
            raise ValueError(f"{step.get('path')!r} is not a command a VM start may carry")
    for step in steps:
        await COMMANDS[step["path"]](a, {**step["body"], "hostUuid": b["hostUuid"]})
    warnings = await _plug(a, spec)
    a.expect(b["hostUuid"], spec.uuid, "Running")
    try:
        await a.driver(b["hostUuid"]).start_vm(spec)
    except BaseException:
        a.expect(b["hostUuid"], spec.uuid, None)
        raise
    return {"warnings": warnings}


@command("/vm/prepare-migration")
async def _prepare_migration(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    """On the destination, before a live migration: the incoming domain plugs into bridges that
    must exist already (libvirt does not create them)."""
    spec = _vm_spec(a, b["vm"])
    warnings = await _plug(a, spec)
    return {"warnings": warnings, "consoleLog": spec.console_log}


@command("/vm/stop")
async def _stop(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).stop_vm(b["vmUuid"], b.get("graceful", True), b.get("timeout", 60))
    return {}


@command("/vm/reboot")
async def _reboot(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).reboot_vm(b["vmUuid"])
    return {}


@command("/vm/pause")
async def _pause(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).pause_vm(b["vmUuid"])
    return {}


@command("/vm/resume")
async def _resume(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).resume_vm(b["vmUuid"])
    return {}


@command("/vm/destroy")
async def _destroy(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).destroy_vm(b["vmUuid"])
    return {}


@command("/vm/states")
async def _states(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    return {"states": await a.driver(b["hostUuid"]).vm_states()}


@command("/vm/attach-disk")
async def _attach_disk(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).attach_disk(b["vmUuid"], _disk(a, b["disk"]))
    return {}


@command("/vm/detach-disk")
async def _detach_disk(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).detach_disk(b["vmUuid"], _disk(a, b["disk"]))
    return {}


@command("/vm/attach-nic")
async def _attach_nic(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    """Hot-plug a NIC into a running VM (AttachL3NetworkToVm): its bridge first, as at a start."""
    nic = NicSpec(**b["nic"])
    warnings = await _bridges(a, b["vmUuid"], [nic])
    await a.driver(b["hostUuid"]).attach_nic(b["vmUuid"], nic)
    return {"warnings": warnings}


@command("/vm/detach-nic")
async def _detach_nic(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).detach_nic(b["vmUuid"], NicSpec(**b["nic"]))
    return {}


@command("/vm/attach-iso")
async def _attach_iso(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).attach_iso(b["vmUuid"], a.real(b["isoPath"]))
    return {}


@command("/vm/detach-iso")
async def _detach_iso(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    await a.driver(b["hostUuid"]).detach_iso(b["vmUuid"])
    return {}


@command("/vm/console")
async def _console(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    addr = await a.driver(b["hostUuid"]).console_address(b["vmUuid"])
    return {"hostIp": addr.host_ip, "port": addr.port, "protocol": addr.protocol}


@command("/vm/migrate")
async def _migrate(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    """Live migration to another host. Real: libvirt migrates the running domain to ``destUri``
    (peer to peer, shared storage). Simulated: the domain moves to the destination's driver
    (on this agent) and the move is recorded."""
    source, dest, vm = b["hostUuid"], b["destHostUuid"], b["vmUuid"]
    driver = a.driver(source)
    if a.multi_host:
        target = a.drivers.get(dest)
        if target is None:
            raise DriverError("HOST_NOT_CONNECTED", "the destination host is not connected to this agent", dest)
        await driver.migrate_vm(vm, b.get("destUri", ""), dest, target)
        a.migrations.append({"vmUuid": vm, "from": source, "to": dest, "at": time.time()})
    else:
        await driver.migrate_vm(vm, b["destUri"], dest, None, b.get("destConsoleLog"))
    return {}


@storage_command("init")
async def _ls_init(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    root = a.real(b["path"])
    if shared and not st.simulate and not os.path.isdir(root):
        raise DriverError("STORAGE_NOT_MOUNTED", "the shared mount point is not there",
                          f"{root} does not exist on this host; mount the shared file system there first")
    total, available = await st.capacity(root, b.get("simulatedCapacity") or (1 << 40))
    if not shared:  # a shared file system may be in the middle of another host's copy
        st.clean_partials(root)
    return {"totalCapacity": total, "availableCapacity": available}


@storage_command("create-root")
async def _ls_root(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    root, path = a.real(b["path"]), a.real(b["installPath"])
    if b.get("empty"):
        actual = await st.create_empty(root, path, b["size"])
    else:
        cache = await st.cache_image(root, b["imageUuid"], b["imageUrl"], b.get("md5"))
        actual = await st.create_from_image(root, path, cache, b.get("size", 0))
    return {"actualSize": actual}


@storage_command("create-empty")
async def _ls_empty(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    return {"actualSize": await st.create_empty(a.real(b["path"]), a.real(b["installPath"]), b["size"])}


@storage_command("cache-image")
async def _ls_cache(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    cache = await st.cache_image(a.real(b["path"]), b["imageUuid"], b["imageUrl"], b.get("md5"))
    return {"cachePath": a.logical(cache)}


@storage_command("delete")
async def _ls_delete(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    await st.delete(a.real(b["path"]), a.real(b["installPath"]))
    return {}


@storage_command("info")
async def _ls_info(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    out = await st.info(a.real(b["path"]), a.real(b["installPath"]))
    if out.get("backing"):
        out["backing"] = a.logical(str(out["backing"]))
    return out


@storage_command("snapshot")
async def _ls_snapshot(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    """Take a snapshot: ``installPath`` (the volume's file) is frozen and the volume continues in
    ``newInstallPath`` on top of it. A running VM switches files live (``vmUuid``, ``disk``)."""
    root, old, new = a.real(b["path"]), a.real(b["installPath"]), a.real(b["newInstallPath"])
    if b.get("vmUuid"):
        disk = _disk(a, b["disk"])
        await a.driver(b["hostUuid"]).snapshot_disk(b["vmUuid"], disk, new)
        if st.simulate:
            st.files[new], st.backing[new] = 0, old
    else:
        await st.overlay(root, old, new)
    return {"size": st.actual_size(old)}


@storage_command("overlay")
async def _ls_overlay(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    await st.overlay(a.real(b["path"]), a.real(b["backing"]), a.real(b["installPath"]))
    return {}


@storage_command("rebase")
async def _ls_rebase(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    backing = a.real(b["backing"]) if b.get("backing") else None
    return {"actualSize": await st.rebase(a.real(b["path"]), a.real(b["installPath"]), backing)}


@storage_command("pull")
async def _ls_pull(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    """Copy a volume's files from another host's agent (``sourceUrl``, ``sourceHostUuid``), which
    serves them at GET /storage/file."""
    root = a.real(b["path"])
    files = [
        PullFile(a.real(f["installPath"]), f["installPath"], a.real(f["backing"]) if f.get("backing") else None,
                 bool(f.get("skipIfExists")))
        for f in b["files"]
    ]

    def fetch(f: PullFile) -> str:
        query = urlencode({"hostUuid": b["sourceHostUuid"], "path": f.source_path})
        return f"{b['sourceUrl']}/storage/file?{query}"

    source = a.store(b["sourceHostUuid"], shared) if st.simulate else None
    sizes = await st.pull(root, files, fetch, source)
    return {"sizes": {a.logical(k): v for k, v in sizes.items()}}


@storage_command("export")
async def _ls_export(a: Agent, b: dict[str, Any], st: LocalStorage, shared: bool) -> dict[str, Any]:
    """A flattened qcow2 of a volume's (or snapshot's) file, for a backup storage to fetch at GET
    /storage/file (images from volumes)."""
    return await st.export(a.real(b["path"]), a.real(b["installPath"]), a.real(b["exportPath"]))


@command("/bs/connect")
async def _bs_connect(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    a.remember_root(b["path"], backup=True)
    total, available = await a.backup.capacity(b["path"])
    return {"totalCapacity": total, "availableCapacity": available}


@command("/bs/download")
async def _bs_download(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    a.remember_root(b["path"], backup=True)
    policy = FetchPolicy.from_wire(b.get("policy"))
    return await a.backup.download(b["path"], b["imageUuid"], b["url"], b["format"], b.get("md5"), policy)


@command("/bs/pull")
async def _bs_pull(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    """Fetch an image made from a volume from the host agent that exported it (``sourceUrl``,
    ``sourceHostUuid``, ``sourcePath``), over the agents' mutual TLS."""
    a.remember_root(b["path"], backup=True)
    query = urlencode({"hostUuid": b["sourceHostUuid"], "path": b["sourcePath"]})
    return await a.backup.pull(b["path"], b["imageUuid"], b.get("format") or "qcow2",
                               f"{b['sourceUrl']}/storage/file?{query}")


@command("/bs/info")
async def _bs_info(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    """An image file's size on the backup storage (SyncImageSize)."""
    a.remember_root(b["path"], backup=True)
    out = a.backup.info(b["path"], b["installPath"])
    if out["exists"]:
        out["size"] = await virtual_size(Path(b["installPath"]), b.get("format") or "qcow2", int(out["actualSize"]))
    return out


@command("/bs/progress")
async def _bs_progress(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    return {"progress": a.backup.progress.get(b["imageUuid"])}


@command("/bs/delete")
async def _bs_delete(a: Agent, b: dict[str, Any]) -> dict[str, Any]:
    a.remember_root(b["path"], backup=True)
    await a.backup.delete(b["path"], b["installPath"])
    return {}
