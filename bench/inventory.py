"""Build a large inventory through the API (simulator hosts) and time the list APIs on it, beside
the figures ShapeBlue published for CloudStack at 25,000 hosts.

    .venv/bin/python bench/inventory.py                  # defaults: a few minutes
    .venv/bin/python bench/inventory.py --shapeblue      # 25,000 hosts, VMs, L3s, accounts; 50,000 volumes
    .venv/bin/python bench/inventory.py --hosts 5000 --vms 5000 --volumes 10000 --l3s 5000 --accounts 5000

It starts ``nimbostack server`` (SQLite in a temporary data dir) and a simulator agent, as
bench/create_vms.py does, and populates, every item by its ZStack API: AddSimulatorHost,
CreateL3Network, CreateAccount, CreateVmInstance (each with its root volume) and
CreateDataVolume for the volumes beyond the VMs' root volumes. Then it prints:

* the populate rate: seconds per 1,000 of each kind;
* per list API: the first page (``limit`` 500) and ``count=true``, the median of ``--runs``, beside
  CloudStack's average/best/worst (ShapeBlue, 25,000 hosts): listAccounts 49.6/22.9/98.5 s,
  listNetworks 43.6/24.1/96.9 s, listVirtualMachines 11.8/9.8/17.3 s, listVolumes 9.2/4.8/14.4 s,
  listHosts 7.6/5.3/12.9 s;
* AttachNetworkServiceToL3Network (and its detach) on an L3 network without VMs, median of
  ``--runs``: its cost should not follow the number of hosts;
* the CPU the server and the agent use while idle for ``--idle`` seconds (pings of every host,
  the GC and expunge polls).

The child processes import nimbostack as this interpreter would: run with
``PYTHONPATH=/path/to/src`` to measure another tree. This is not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# create_vms.py has the HTTP client and the subprocesses; the checkout's root is put on the path
# so that it is found as bench.create_vms however this script is run (python -I leaves out its folder)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import create_vms as cv  # noqa: E402

PAGE = 500
DIGEST = hashlib.sha512(b"password").hexdigest()  # the wire carries a password as its SHA-512
# (nimbostack query, CloudStack API, its average, best and worst seconds at ShapeBlue's scale)
LISTS = (
    ("QueryAccount", "listAccounts", 49.6, 22.9, 98.5),
    ("QueryL3Network", "listNetworks", 43.6, 24.1, 96.9),
    ("QueryVmInstance", "listVirtualMachines", 11.8, 9.8, 17.3),
    ("QueryVolume", "listVolumes", 9.2, 4.8, 14.4),
    ("QueryHost", "listHosts", 7.6, 5.3, 12.9),
)
SHAPEBLUE = {"hosts": 25000, "vms": 25000, "volumes": 50000, "l3s": 25000, "accounts": 25000}


async def in_parallel(n: int, concurrency: int, one: Callable[[int], Awaitable[Any]], what: str) -> float:
    """Run ``one(i)`` for i < n, ``concurrency`` at a time: the seconds it took (a failure ends the run)."""
    t0 = time.perf_counter()
    next_i, done, last = 0, 0, t0

    async def worker() -> None:
        nonlocal next_i, done, last
        while next_i < n:
            i = next_i
            next_i += 1
            await one(i)
            done += 1
            if time.perf_counter() - last >= 10:
                last = time.perf_counter()
                print(f"  ... {what}: {done}/{n}, {done / (last - t0):.0f}/s", flush=True)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    return time.perf_counter() - t0


async def median_ms(runs: int, fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    samples, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = await fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples), out


async def populate(c: Any, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, tuple[int, float]]]:
    rates: dict[str, tuple[int, float]] = {}
    t0 = time.perf_counter()
    env = await cv.build_zone(c, args.hosts)  # AddSimulatorHost x hosts, 10 at a time
    rates["hosts (AddSimulatorHost)"] = (args.hosts, time.perf_counter() - t0)
    l2 = (await c.query("QueryL2Network", limit=1))["inventories"][0]
    flat = (await c.query("QueryNetworkServiceProvider", ("type", "=", "Flat")))["inventories"][0]
    env["l2"], env["flat"] = l2, flat

    async def l3(i: int) -> None:
        await c.call("CreateL3Network", name=f"l3-{i}", l2NetworkUuid=l2["uuid"])

    rates["L3 networks (CreateL3Network)"] = (args.l3s, await in_parallel(args.l3s, args.concurrency, l3, "L3s"))

    async def account(i: int) -> None:
        await c.call("CreateAccount", name=f"tenant-{i}", password=DIGEST)

    rates["accounts (CreateAccount)"] = (
        args.accounts, await in_parallel(args.accounts, args.concurrency, account, "accounts"))

    async def vm(i: int) -> None:
        await c.call("CreateVmInstance", name=f"vm-{i}", imageUuid=env["image"]["uuid"],
                     instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[env["l3"]["uuid"]])

    rates["VMs (CreateVmInstance)"] = (args.vms, await in_parallel(args.vms, args.concurrency, vm, "VMs"))
    data = max(0, args.volumes - args.vms)
    disk = (await c.call("CreateDiskOffering", name="d1", diskSize=1 << 30))["inventory"]

    async def volume(i: int) -> None:
        await c.call("CreateDataVolume", name=f"vol-{i}", diskOfferingUuid=disk["uuid"])

    rates["data volumes (CreateDataVolume)"] = (data, await in_parallel(data, args.concurrency, volume, "volumes"))
    return env, rates


async def attach_timing(c: Any, env: dict[str, Any], runs: int) -> tuple[float, float]:
    """Median ms of AttachNetworkServiceToL3Network and of its detach, on an L3 network without VMs."""
    l3 = (await c.call("CreateL3Network", name="attach-bench", l2NetworkUuid=env["l2"]["uuid"]))["inventory"]
    await c.call("AddIpRange", l3NetworkUuid=l3["uuid"], name="r", startIp="192.168.10.10",
                 endIp="192.168.10.200", netmask="255.255.255.0", gateway="192.168.10.1")
    services = {env["flat"]["uuid"]: ["DHCP", "Userdata"]}
    attach, detach = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        await c.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3["uuid"], networkServices=services)
        t1 = time.perf_counter()
        await c.call("DetachNetworkServiceFromL3Network", l3NetworkUuid=l3["uuid"], networkServices=services)
        attach.append((t1 - t0) * 1000)
        detach.append((time.perf_counter() - t1) * 1000)
    return statistics.median(attach), statistics.median(detach)


async def bench(args: argparse.Namespace, procs: Any) -> int:
    procs.start()
    pid, agent_pid = procs.server.pid, procs.procs[0].pid
    print(f"server pid {pid} on {procs.url}, data in {procs.data_dir}", flush=True)
    c = cv.Client(procs.url, args.concurrency, 0.2)
    try:
        await c.login()
        cpu0 = cv.cpu_seconds(pid) + cv.cpu_seconds(agent_pid)
        env, rates = await populate(c, args)
        cpu1 = cv.cpu_seconds(pid) + cv.cpu_seconds(agent_pid)
        print()
        print(f"populate (server + agent CPU {cpu1 - cpu0:.0f} s), {args.concurrency} calls in flight")
        print(f"  {'kind':34} {'count':>7} {'seconds':>8} {'s per 1,000':>12}")
        for kind, (n, secs) in rates.items():
            per = secs * 1000 / n if n else float("nan")
            print(f"  {kind:34} {n:7d} {secs:8.1f} {per:12.1f}")
        print()
        print(f"list APIs, median of {args.runs} (first page: limit {PAGE}, full inventories)")
        print(f"  {'API':16} {'total':>7} {'page ms':>8} {'count ms':>9}   CloudStack ({'avg/best/worst s'})")
        for name, cs_name, avg, best, worst in LISTS:
            page_ms, page = await median_ms(args.runs, lambda n=name: c.query(n, limit=PAGE))
            count_ms, counted = await median_ms(args.runs, lambda n=name: c.query(n, count=True))
            assert len(page["inventories"]) == min(PAGE, counted["total"])
            print(f"  {name:16} {counted['total']:7d} {page_ms:8.1f} {count_ms:9.1f}   "
                  f"{cs_name} {avg}/{best}/{worst}")
        print()
        cpu0 = cv.cpu_seconds(pid) + cv.cpu_seconds(agent_pid)
        a_ms, d_ms = await attach_timing(c, env, args.runs)
        cpu = (cv.cpu_seconds(pid) + cv.cpu_seconds(agent_pid) - cpu0) / (2 * args.runs)
        print(f"AttachNetworkServiceToL3Network on an L3 without VMs, {args.hosts} hosts: "
              f"{a_ms:.1f} ms (detach {d_ms:.1f} ms), median of {args.runs}; "
              f"server + agent CPU {cpu:.2f} s per call")
        if args.idle:
            await asyncio.sleep(2)  # let the last calls' work settle
            idle0 = (cv.cpu_seconds(pid), cv.cpu_seconds(agent_pid))
            await asyncio.sleep(args.idle)
            idle1 = (cv.cpu_seconds(pid), cv.cpu_seconds(agent_pid))
            server, agent = (b - a for a, b in zip(idle0, idle1, strict=True))
            print(f"idle {args.idle} s with {args.hosts} hosts: server {server:.2f} CPU-s "
                  f"({server / args.idle * 100:.1f}% of a core), agent {agent:.2f} CPU-s")
        return 0
    finally:
        await c.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=1000)
    p.add_argument("--vms", type=int, default=1000)
    p.add_argument("--volumes", type=int, default=2000, help="in all: the VMs' root volumes, then data volumes")
    p.add_argument("--l3s", type=int, default=1000)
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--shapeblue", action="store_true", help="ShapeBlue's sizes: " + str(SHAPEBLUE))
    p.add_argument("--concurrency", type=int, default=20, help="API calls in flight while populating")
    p.add_argument("--runs", type=int, default=10, help="runs of each timed call (the median is printed)")
    p.add_argument("--idle", type=int, default=60, help="seconds of idle CPU to measure (0: skip)")
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir and logs")
    args = p.parse_args()
    if args.shapeblue:
        for k, v in SHAPEBLUE.items():
            setattr(args, k, v)
    # a SIGTERM ends the run like Ctrl-C: the server and agent this script started go with it
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    procs = cv.Processes(Path(tempfile.mkdtemp(prefix="nimbo-inventory-")))
    try:
        return asyncio.run(bench(args, procs))
    except KeyboardInterrupt:
        return 130
    finally:
        procs.close(args.keep)


if __name__ == "__main__":
    sys.exit(main())
