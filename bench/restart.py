"""Restart a management node with many simulated hosts and print how long it takes to serve again.

    .venv/bin/python bench/restart.py                   # 25,000 simulated hosts on local storage
    .venv/bin/python bench/restart.py --hosts 2000      # a quicker round

It starts ``nimbostack server`` (SQLite in a temporary data dir) and one simulator agent for every
host (as ``bench/create_vms.py`` does), builds a zone with a cluster and a LocalStorage attached to
it, and adds ``--hosts`` simulated hosts with ``--concurrency`` AddSimulatorHost calls in flight,
printing the cost per host of the first and the last 1,000 (wall time per host at that
concurrency, and the server's CPU time per host). Then it stops the server (SIGTERM), starts it
again on the same data dir and prints the time from the start to a serving API (``/health`` 200
and a QueryZone answered), and to every host reading Connected.

Targets on a 2-core machine with SQLite at 25,000 hosts: a serving API in < 5 s, all hosts
Connected in < 60 s; adding a host costs the same at 1,000 and at 25,000 hosts (within 20 %).
Profile the restarted server while it reconnects: ``py-spy record -o /tmp/r.svg --pid <pid>``
(``--hold`` keeps this script waiting for Enter before the restart, to attach it).

This is not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx


def _sibling(name: str) -> ModuleType:
    """A benchmark next to this one, loaded by its path (a script's folder is not on sys.path
    under ``python -I``): create_vms.py has the HTTP client and the subprocesses."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cv = _sibling("create_vms")
STEP = 1000  # hosts per measured batch


async def build_zone(c: Any) -> str:
    """A zone, a Simulator cluster with a LocalStorage attached: the cluster's uuid."""
    zone = (await c.call("CreateZone", name="restart-zone"))["inventory"]
    cluster = (await c.call("CreateCluster", name="c1", zoneUuid=zone["uuid"], hypervisorType="Simulator"))[
        "inventory"
    ]
    ps = (await c.call("AddLocalPrimaryStorage", name="ps", url="/nimbo/ps", zoneUuid=zone["uuid"]))["inventory"]
    await c.call("AttachPrimaryStorageToCluster", primaryStorageUuid=ps["uuid"], clusterUuid=cluster["uuid"])
    return str(cluster["uuid"])


async def add_hosts(c: Any, cluster: str, start: int, count: int, concurrency: int) -> None:
    queue = iter(range(start, start + count))

    async def worker(w: int) -> None:
        for i in queue:
            await c.raw_ok(
                "AddSimulatorHost",
                {
                    "name": f"host{i}",
                    "managementIp": f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}",
                    "clusterUuid": cluster,
                    "cpuCapacity": 64 * 2600,
                    "memoryCapacity": 256 << 30,
                },
                w,
            )

    await asyncio.gather(*(worker(w) for w in range(concurrency)))


class Client(cv.Client):  # type: ignore[misc,name-defined]
    async def raw_ok(self, name: str, params: dict[str, Any], worker: int) -> dict[str, Any]:
        reply: dict[str, Any] = await self.raw(name, params, worker)
        if not reply.get("success"):
            raise cv.Failure(f"{name}: {reply.get('error')}")
        return reply


async def fill(args: argparse.Namespace, procs: Any) -> list[tuple[int, float, float]]:
    """Add the hosts in batches of STEP: (hosts before the batch, wall ms per host, server CPU ms per host)."""
    c = Client(procs.url, args.concurrency, 0.2)
    pid = procs.server.pid
    batches: list[tuple[int, float, float]] = []
    try:
        await c.login()
        cluster = await build_zone(c)
        done = 0
        while done < args.hosts:
            n = min(STEP, args.hosts - done)
            t0, cpu0 = time.perf_counter(), cv.cpu_seconds(pid)
            await add_hosts(c, cluster, done, n, args.concurrency)
            wall, cpu = time.perf_counter() - t0, cv.cpu_seconds(pid) - cpu0
            batches.append((done, wall * 1000 / n, cpu * 1000 / n))
            done += n
            print(f"  ... {done} hosts, {n / wall:.0f} hosts/s", flush=True)
    finally:
        await c.close()
    return batches


def restart_server(procs: Any) -> float:
    """SIGTERM the server, then start it again on the same data dir and port: the start time."""
    old = procs.server
    old.send_signal(signal.SIGTERM)
    old.wait(60)
    procs.procs.remove(old)
    command = list(old.args)
    log = open(procs.data_dir / "server-2.log", "wb")  # noqa: SIM115 - the child writes it
    t0 = time.perf_counter()
    procs.server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    procs.procs.append(procs.server)
    return t0


async def wait_serving(procs: Any, t0: float) -> tuple[float, Any]:
    """Seconds from t0 to /health 200 and a query answered; the logged-in client."""
    async with httpx.AsyncClient(timeout=2) as http:
        while True:
            if procs.server.poll() is not None:
                raise SystemExit(f"the restarted server exited; see {procs.data_dir}/server-2.log")
            try:
                if (await http.get(f"{procs.url}/health")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.02)
    c = Client(procs.url, 1, 0.2)
    await c.login()
    await c.query("QueryZone", fields=["uuid"])
    return time.perf_counter() - t0, c


async def wait_connected(c: Any, hosts: int, t0: float) -> tuple[float, int]:
    """Seconds from t0 until every host reads Connected (or stops changing: then what is left)."""
    last_report = time.perf_counter()
    while True:
        total = (await c.query("QueryHost", ("status", "=", "Connected"), count=True))["total"]
        now = time.perf_counter()
        if total >= hosts:
            return now - t0, 0
        if now - last_report >= 5:
            last_report = now
            print(f"  ... {total}/{hosts} Connected after {now - t0:.1f} s", flush=True)
        if now - t0 > 600:
            return now - t0, hosts - total
        await asyncio.sleep(0.1)


async def after_restart(procs: Any, hosts: int, t0: float) -> tuple[float, float, int]:
    serving, c = await wait_serving(procs, t0)
    try:
        connected, missing = await wait_connected(c, hosts, t0)
    finally:
        await c.close()
    return serving, connected, missing


def report(args: argparse.Namespace, batches: list[tuple[int, float, float]], serving: float, connected: float,
           missing: int) -> None:
    first, last = batches[0], batches[-1]
    print()
    print(f"AddSimulatorHost, {args.concurrency} in flight, local storage")
    print(f"  hosts {first[0]:>6}-{first[0] + STEP:<6} {first[1]:8.2f} ms/host wall, {first[2]:6.2f} ms server CPU")
    print(f"  hosts {last[0]:>6}-{last[0] + STEP:<6} {last[1]:8.2f} ms/host wall, {last[2]:6.2f} ms server CPU")
    ratio = last[2] / first[2] if first[2] else float("nan")
    print(f"  last/first (server CPU)   {ratio:8.2f}")
    print(f"restart with {args.hosts} hosts")
    print(f"  to a serving API          {serving:8.2f} s")
    print(f"  to all hosts Connected    {connected:8.2f} s" + (f"   ({missing} never connected)" if missing else ""))
    ok = serving < 5 and connected < 60 and not missing and (len(batches) < 2 or abs(ratio - 1) <= 0.2)
    print("targets (API < 5 s, all Connected < 60 s, add cost within 20 %):", "met" if ok else "MISSED")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=25000)
    p.add_argument("--concurrency", type=int, default=32, help="AddSimulatorHost calls in flight")
    p.add_argument("--hold", action="store_true", help="wait for Enter before the restart (to attach a profiler)")
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir and logs")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    procs = cv.Processes(Path(tempfile.mkdtemp(prefix="nimbo-restart-")))
    try:
        procs.start()
        print(f"server pid {procs.server.pid} on {procs.url}, data in {procs.data_dir}", flush=True)
        batches = asyncio.run(fill(args, procs))
        if args.hold:
            input("press Enter to restart the server ")
        t0 = restart_server(procs)
        print(f"restarted: server pid {procs.server.pid}", flush=True)
        serving, connected, missing = asyncio.run(after_restart(procs, args.hosts, t0))
        report(args, batches, serving, connected, missing)
        return 0
    finally:
        procs.close(args.keep)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
