"""The web UI's two figures (issue 15): the first page of the VM list with 10,000 VMs, and how long a
VM's state change takes to reach 100 open event streams.

    .venv/bin/python bench/ui.py                 # own server + simulator agent, 10,000 VMs
    .venv/bin/python bench/ui.py --vms 1000      # a quicker round

It starts ``nimbostack server`` and a simulator agent as bench/create_vms.py does, creates ``--vms``
VMs through the API, then logs in as the page does (``POST /ui/login``: the session cookie and its
CSRF token) and times

* the list page's request: ``POST /ui/api`` QueryVmInstance with start=0, limit=20,
  replyWithCount=true, sortBy=createDate desc — what the VM page asks first — on loopback, so the
  time is the server's; also the same page filtered (``name like %vm-99%``) and sorted by name;
* event push: ``--streams`` open ``GET /ui/events`` streams; the host's agent posts ``--events`` VM
  state changes on the agent wire (mutual TLS, the agent's certificate), one at a time; the latency
  of each is from the POST to each stream's receipt of the event. p50/p99/max over all receipts.

Targets: list page p99 < 200 ms, push p99 < 2 s (the UI's promise: a change shows within 2 s).
This is not a test: it prints figures."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: bench/ is then the path
from bench.create_vms import Client, Processes, build_zone, create_all, pct  # noqa: E402


class Streams:
    """``n`` event streams of one cookie session, each a raw connection (as a browser tab holds)."""

    def __init__(self, url: str, cookie: str, n: int) -> None:
        self.url, self.cookie, self.n = httpx.URL(url), cookie, n
        self.seen: dict[str, list[float]] = {}  # "<vm>/<state>/<seq>" → receipt times
        self.tasks: list[asyncio.Task[None]] = []
        self.open = 0
        self.changed = asyncio.Event()  # set at each stream opened and each event received

    async def _one(self) -> None:
        reader, writer = await asyncio.open_connection(self.url.host, self.url.port)
        writer.write(f"GET /ui/events HTTP/1.1\r\nHost: {self.url.host}\r\nCookie: {self.cookie}\r\n"
                     "Accept: text/event-stream\r\n\r\n".encode())
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            raise SystemExit(f"GET /ui/events: {status!r}")
        self.open += 1
        self.changed.set()
        try:
            while line := await reader.readline():
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    if event.get("resourceType") == "VmInstanceVO":
                        self.seen.setdefault(f"{event['uuid']}/{event['state']}", []).append(time.perf_counter())
                        self.changed.set()
        finally:
            writer.close()

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(self._one()) for _ in range(self.n)]
        await self.until(lambda: self.open >= self.n, 30)
        if self.open < self.n:
            raise SystemExit(f"only {self.open} of {self.n} streams opened")

    async def until(self, done: Any, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while not done() and (left := deadline - time.perf_counter()) > 0:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                return

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def time_page(ui: httpx.AsyncClient, runs: int, **params: Any) -> list[float]:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = await ui.post("/ui/api", json={"APIQueryVmInstanceMsg": {"conditions": [], **params}})
        samples.append((time.perf_counter() - t0) * 1000)
        (reply,) = json.loads(r.json()["result"]).values()
        if not reply["success"] or len(reply["inventories"]) > 20:
            raise SystemExit(f"the list page failed: {reply}")
    return samples


async def bench(args: argparse.Namespace, procs: Processes) -> int:
    c = Client(procs.url, args.concurrency, 0.5)
    ui = httpx.AsyncClient(base_url=procs.url, timeout=60, headers={"Origin": procs.url})
    try:
        await c.login()
        env = await build_zone(c, args.hosts)
        t0 = time.perf_counter()
        run = await create_all(c, env, args.vms, args.concurrency)
        if run["errors"]:
            print(f"  {len(run['errors'])} creations failed, e.g. {run['errors'][0]}")
        print(f"{len(run['latencies'])} VMs created in {time.perf_counter() - t0:.0f} s", flush=True)

        r = await ui.post("/ui/login", json={"accountName": "admin", "password": "password"})
        r.raise_for_status()
        ui.headers["X-CSRF-Token"] = ui.cookies["nimbo_csrf"]
        page = {"start": 0, "limit": 20, "replyWithCount": True}
        first = await time_page(ui, args.runs, **page, sortBy="createDate", sortDirection="desc")
        by_name = await time_page(ui, args.runs, **page, sortBy="name", sortDirection="asc")
        unsorted = await time_page(ui, args.runs, **page)
        filtered = await time_page(ui, args.runs, start=0, limit=20, replyWithCount=True,
                                   conditions=[{"name": "name", "op": "like", "value": "%vm-99%"}])
        print()
        print(f"VM list, first page of 20 with the total, {args.vms} VMs, {args.runs} runs each (ms)")
        for label, s in (("createDate desc", first), ("name asc", by_name), ("no sort", unsorted),
                         ("name like %vm-99%", filtered)):
            print(f"  {label:20s} median {statistics.median(s):7.1f}   p99 {pct(s, 0.99):7.1f}   max {max(s):7.1f}")

        vms = (await c.query("QueryVmInstance", ("state", "=", "Running"), limit=args.events))["inventories"]
        cookie = f"nimbo_session={ui.cookies['nimbo_session']}"
        streams = Streams(procs.url, cookie, args.streams)
        await streams.start()
        ctx = ssl.create_default_context(cafile=str(procs.data_dir / "data" / "pki" / "ca.crt"))
        ctx.load_cert_chain(str(procs.data_dir / "agent.pem"))
        wire = httpx.AsyncClient(base_url=f"https://127.0.0.1:{procs.wire_port}", verify=ctx, timeout=30)
        latencies: list[float] = []
        missed = 0
        try:
            for i in range(args.events):
                vm = vms[i % len(vms)]
                state = "Stopped" if (i // len(vms)) % 2 == 0 else "Running"
                key = f"{vm['uuid']}/{state}"
                streams.seen.pop(key, None)
                sent = time.perf_counter()
                r = await wire.post("/agent/events", json={"hostUuid": vm["hostUuid"], "vmUuid": vm["uuid"],
                                                           "state": state})
                r.raise_for_status()
                await streams.until(lambda key=key: len(streams.seen.get(key, [])) >= args.streams, 5)
                got = streams.seen.get(key, [])
                missed += args.streams - len(got)
                latencies += [(at - sent) * 1000 for at in got]
        finally:
            await wire.aclose()
            await streams.stop()
        print(f"event push: {args.events} agent events, {args.streams} open streams, "
              f"{len(latencies)} receipts ({missed} missed) (ms)")
        print(f"  agent POST → stream  p50 {pct(latencies, 0.5):7.1f}   p99 {pct(latencies, 0.99):7.1f}   "
              f"max {max(latencies, default=float('nan')):7.1f}")
        met = pct(first, 0.99) < 200 and pct(latencies, 0.99) < 2000 and not missed
        print("targets (list page p99 < 200 ms, push p99 < 2 s, none missed):", "met" if met else "MISSED")
        return 0
    finally:
        await ui.aclose()
        await c.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vms", type=int, default=10000)
    p.add_argument("--hosts", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--events", type=int, default=100)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir and logs")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    procs = Processes(Path(tempfile.mkdtemp(prefix="nimbo-bench-ui-")))
    try:
        procs.start()
        return asyncio.run(bench(args, procs))
    finally:
        procs.close(args.keep)


if __name__ == "__main__":
    raise SystemExit(main())
