"""Create many VMs over the HTTP API, as a client would, and print throughput, latency, memory and
query figures.

    .venv/bin/python bench/create_vms.py                       # own server + simulator agent, 10,000 VMs
    .venv/bin/python bench/create_vms.py --vms 1000            # a quicker round
    .venv/bin/python bench/create_vms.py --url http://127.0.0.1:8080 --server-pid 1234

By default it starts ``nimbostack server`` (SQLite in a temporary data dir) and ``nimbostack agent
--driver simulator`` as subprocesses, builds a zone with ``--hosts`` simulated hosts and an IP range
large enough for the VMs, then keeps ``--concurrency`` CreateVmInstance calls in flight until
``--vms`` were issued. Each call is the ZStack wire: POST /zstack/api, then GET
/zstack/api/result/JOB while the job is Processing (50 ms, then x1.5 up to ``--poll``); its latency
runs from the POST to the Done answer. Targets on a 2-core machine with SQLite: >= 100 VMs/s,
p99 < 5 s, RSS < 500 MiB, a two-condition query < 50 ms, count=true < 20 ms.

Besides those it prints the CPU time the server, the agent and this client spent per VM (from
/proc; on a shared machine the CPU figures are steadier than the throughput) and the result polls
per VM. Profile the server while it runs: ``py-spy record -o /tmp/x.svg --pid <server pid>``.

This is not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
NIMBOSTACK = ROOT / ".venv" / "bin" / "nimbostack"
if not NIMBOSTACK.exists():
    NIMBOSTACK = Path(shutil.which("nimbostack") or "nimbostack")


def _full_names() -> dict[str, str]:
    """Short API name → the wire's full message name, from the API table shipped with nimbostack."""
    try:
        sys.path.insert(0, str(ROOT / "src"))
        from nimbostack.core import spec

        return {name: msg.full_name for name, msg in spec.messages().items()}
    except Exception:  # an installed node elsewhere: the server also accepts the short API<Name>Msg form
        return {}


FULL = _full_names()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Failure(Exception):
    pass


class Client:
    """The ZStack wire over httpx async: POST /zstack/api, then poll /zstack/api/result/JOB.

    httpcore's pool bookkeeping costs time proportional to (or, for idle connections, the square of)
    the pool's size on every request, so the in-flight calls are spread over small pools of
    ``PER_POOL`` connections each: one big pool made this client use more CPU than the server."""

    PER_POOL = 10

    def __init__(self, base: str, concurrency: int, poll: float) -> None:
        self.base = base.rstrip("/")
        # keep-alive shorter than the server's (uvicorn: 5 s) so no request races a closing connection
        limits = httpx.Limits(
            max_connections=self.PER_POOL, max_keepalive_connections=self.PER_POOL, keepalive_expiry=2.0
        )
        self.pools = [
            httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0))
            for _ in range(max(1, -(-concurrency // self.PER_POOL)))
        ]
        self.session: str | None = None
        self.poll = poll
        self.polls = 0

    async def raw(self, name: str, params: dict[str, Any], worker: int = 0) -> dict[str, Any]:
        http = self.pools[worker % len(self.pools)]
        full = FULL.get(name) or f"API{name}Msg"
        body = dict(params)
        if self.session:
            body["session"] = {"uuid": self.session}
        r = await http.post(f"{self.base}/zstack/api", json={full: body})
        if r.status_code != 200:
            raise Failure(f"{name}: HTTP {r.status_code} {r.text[:200]}")
        answer = r.json()
        interval = min(0.05, self.poll)
        while answer["state"] == "Processing":
            # back off like a polite client: 50 ms, then x1.5 up to --poll
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, self.poll)
            self.polls += 1
            r = await http.get(f"{self.base}/zstack/api/result/{answer['uuid']}")
            answer = r.json()
        (reply,) = json.loads(answer["result"]).values()
        return reply

    async def call(self, name: str, /, **params: Any) -> dict[str, Any]:
        reply = await self.raw(name, params)
        if not reply.get("success"):
            raise Failure(f"{name}: {json.dumps(reply.get('error'))[:400]}")
        return reply

    async def query(self, name: str, /, *conds: tuple[str, str, Any], **params: Any) -> dict[str, Any]:
        conditions = [{"name": n, "op": op, "value": v} for n, op, v in conds]
        return await self.call(name, conditions=conditions, **params)

    async def login(self) -> None:
        digest = hashlib.sha512(b"password").hexdigest()
        reply = await self.call("LogInByAccount", accountName="admin", password=digest)
        self.session = reply["inventory"]["uuid"]

    async def close(self) -> None:
        for http in self.pools:
            await http.aclose()


# --- the processes -----------------------------------------------------------------------------


class Processes:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port, self.agent_port = free_port(), free_port()
        self.wire_port = free_port()  # where the agent posts its events (bench/ui.py posts some too)
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.server: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # the agent's credentials from the node's CA, as an operator issues them (README)
        bundle = self.data_dir / "agent.pem"
        subprocess.run([str(NIMBOSTACK), "agent-credentials", "--data-dir", str(self.data_dir / "data"),
                        "--address", f"127.0.0.1:{self.agent_port}", "--out", str(bundle)], check=True)
        log = open(self.data_dir / "agent.log", "wb")  # noqa: SIM115
        self.procs.append(
            subprocess.Popen(
                [
                    str(NIMBOSTACK),
                    "agent",
                    "--driver",
                    "simulator",
                    "--listen",
                    "127.0.0.1",
                    "--port",
                    str(self.agent_port),
                    "--state-dir",
                    str(self.data_dir / "agent"),
                    "--credentials",
                    str(bundle),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log = open(self.data_dir / "server.log", "wb")  # noqa: SIM115
        self.server = subprocess.Popen(
            [
                str(NIMBOSTACK),
                "server",
                "--data-dir",
                str(self.data_dir / "data"),
                "--listen",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--wire-port",
                str(self.wire_port),
                "--simulator-agent-url",
                f"https://127.0.0.1:{self.agent_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(self.server)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise SystemExit(f"a subprocess exited early; see {self.data_dir}/*.log")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit("the management node did not start within 60 s")

    def close(self, keep: bool) -> None:
        """Stop the processes; remove their data dir and logs unless ``keep``."""
        self.stop()
        if keep:
            print(f"kept {self.data_dir}")
        else:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time a process has used so far (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class RssSampler:
    """Peak resident memory of a process, sampled every ``interval`` seconds (and VmHWM at the end)."""

    def __init__(self, pid: int | None, interval: float = 0.5) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def _read(self, key: str) -> int:
        if self.pid is None:
            return 0
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return 0
        return 0

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self._read("VmRSS"))
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self.pid is not None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> int:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        return max(self.peak, self._read("VmHWM"))


# --- the zone ----------------------------------------------------------------------------------


async def build_zone(c: Client, hosts: int) -> dict[str, Any]:
    """Like tests/conftest.py::build_zone, with many big hosts and a /15 of addresses."""
    zone = (await c.call("CreateZone", name="bench-zone"))["inventory"]
    cluster = (await c.call("CreateCluster", name="c1", zoneUuid=zone["uuid"], hypervisorType="Simulator"))["inventory"]
    ps = (await c.call("AddLocalPrimaryStorage", name="ps", url="/nimbo/ps", zoneUuid=zone["uuid"]))["inventory"]
    await c.call("AttachPrimaryStorageToCluster", primaryStorageUuid=ps["uuid"], clusterUuid=cluster["uuid"])
    sem = asyncio.Semaphore(10)

    async def add_host(i: int) -> dict[str, Any]:
        async with sem:
            return (
                await c.call(
                    "AddSimulatorHost",
                    name=f"host{i}",
                    managementIp=f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}",
                    clusterUuid=cluster["uuid"],
                    cpuCapacity=1000 * 2600,
                    memoryCapacity=4 << 40,
                )
            )["inventory"]

    host_list = await asyncio.gather(*(add_host(i) for i in range(hosts)))
    bs = (await c.call("AddSimulatorBackupStorage", name="bs", url="/nimbo/bs"))["inventory"]
    await c.call("AttachBackupStorageToZone", backupStorageUuid=bs["uuid"], zoneUuid=zone["uuid"])
    image = (
        await c.call(
            "AddImage",
            name="tiny",
            url="http://example.invalid/tiny.qcow2",
            format="qcow2",
            backupStorageUuids=[bs["uuid"]],
        )
    )["inventory"]
    l2 = (await c.call("CreateL2NoVlanNetwork", name="l2", zoneUuid=zone["uuid"], physicalInterface="eth0"))[
        "inventory"
    ]
    await c.call("AttachL2NetworkToCluster", l2NetworkUuid=l2["uuid"], clusterUuid=cluster["uuid"])
    l3 = (await c.call("CreateL3Network", name="l3", l2NetworkUuid=l2["uuid"]))["inventory"]
    await c.call(
        "AddIpRange",
        l3NetworkUuid=l3["uuid"],
        name="r1",
        startIp="198.18.0.10",
        endIp="198.19.255.250",
        netmask="255.254.0.0",
        gateway="198.18.0.1",
    )
    await c.call("AddDnsToL3Network", l3NetworkUuid=l3["uuid"], dns="198.18.0.1")
    flat = (await c.query("QueryNetworkServiceProvider", ("type", "=", "Flat")))["inventories"][0]
    await c.call(
        "AttachNetworkServiceProviderToL2Network", l2NetworkUuid=l2["uuid"], networkServiceProviderUuid=flat["uuid"]
    )
    await c.call(
        "AttachNetworkServiceToL3Network",
        l3NetworkUuid=l3["uuid"],
        networkServices={flat["uuid"]: ["DHCP", "Userdata"]},
    )
    offering = (await c.call("CreateInstanceOffering", name="small", cpuNum=1, cpuSpeed=100, memorySize=128 << 20))[
        "inventory"
    ]
    return {"hosts": host_list, "image": image, "l3": l3, "offering": offering}


# --- the run -----------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """The nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def create_all(c: Client, env: dict[str, Any], vms: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    next_index = 0
    done = 0
    t_start = time.perf_counter()
    last_report = t_start

    async def worker(w: int) -> None:
        nonlocal next_index, done, last_report
        while next_index < vms:
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            try:
                reply = await c.raw(
                    "CreateVmInstance",
                    {
                        "name": f"vm-{i}",
                        "imageUuid": env["image"]["uuid"],
                        "instanceOfferingUuid": env["offering"]["uuid"],
                        "l3NetworkUuids": [env["l3"]["uuid"]],
                    },
                    w,
                )
                if reply.get("success"):
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors.append(json.dumps(reply.get("error"))[:300])
            except Exception as err:  # a transport error is a failure too, never the end of the run
                errors.append(f"{type(err).__name__}: {err}"[:300])
            done += 1
            now = time.perf_counter()
            if now - last_report >= 5:
                last_report = now
                print(f"  ... {done}/{vms} answered, {done / (now - t_start):.0f}/s, {len(errors)} failed", flush=True)

    await asyncio.gather(*(worker(w) for w in range(min(concurrency, vms))))
    elapsed = time.perf_counter() - t_start
    return {"elapsed": elapsed, "latencies": latencies, "errors": errors}


async def time_call(c: Client, runs: int, name: str, *conds: tuple[str, str, Any], **params: Any) -> tuple[float, Any]:
    samples = []
    reply: Any = None
    for _ in range(runs):
        t0 = time.perf_counter()
        reply = await c.query(name, *conds, **params)
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples), reply


async def bench(args: argparse.Namespace, procs: Processes | None) -> int:
    if procs is None:
        url, pid, agent_pid = args.url, args.server_pid, args.agent_pid
    else:
        url, pid, agent_pid = procs.url, procs.server.pid if procs.server else None, procs.procs[0].pid
        print(f"server pid {pid} on {url}, data in {procs.data_dir}", flush=True)
    c = Client(url, args.concurrency, args.poll)
    rss = RssSampler(pid)
    try:
        await c.login()
        t0 = time.perf_counter()
        env = await build_zone(c, args.hosts)
        print(f"zone with {args.hosts} hosts built in {time.perf_counter() - t0:.1f} s", flush=True)
        rss.start()
        cpu0 = (cpu_seconds(pid), cpu_seconds(agent_pid), time.process_time())
        c.polls = 0
        run = await create_all(c, env, args.vms, args.concurrency)
        cpu1 = (cpu_seconds(pid), cpu_seconds(agent_pid), time.process_time())
        peak = await rss.stop()

        lat = run["latencies"]
        ok = len(lat)
        print()
        print(f"CreateVmInstance x {args.vms}, {args.concurrency} in flight, {args.hosts} hosts")
        print(f"  sustained          {ok / run['elapsed']:8.1f} VMs/s   ({ok} created in {run['elapsed']:.1f} s)")
        print(f"  latency p50        {pct(lat, 0.50) * 1000:8.0f} ms")
        print(f"  latency p99        {pct(lat, 0.99) * 1000:8.0f} ms")
        print(f"  latency max        {max(lat, default=float('nan')) * 1000:8.0f} ms")
        print(f"  failures           {len(run['errors']):8d}")
        for e in run["errors"][:5]:
            print(f"    {e}")
        per_vm = [(b - a) * 1000 / max(1, args.vms) for a, b in zip(cpu0, cpu1, strict=True)]
        print(
            f"  CPU per VM         {per_vm[0]:8.1f} ms server, {per_vm[1]:.1f} ms agent, {per_vm[2]:.1f} ms this client"
        )
        print(f"  result polls       {c.polls / max(1, args.vms):8.1f} per VM")
        if pid is not None:
            print(f"  server peak RSS    {peak / (1 << 20):8.1f} MiB")
        else:
            print("  server peak RSS         n/a (give --server-pid)")

        host = env["hosts"][len(env["hosts"]) // 2]["uuid"]
        conds = (("state", "=", "Running"), ("hostUuid", "=", host))
        q_ms, reply = await time_call(c, args.runs, "QueryVmInstance", *conds)
        c_ms, creply = await time_call(c, args.runs, "QueryVmInstance", *conds, count=True)
        a_ms, areply = await time_call(c, args.runs, "QueryVmInstance", ("state", "=", "Running"), count=True)
        print(f"QueryVmInstance state=Running hostUuid=<one host>, median of {args.runs}")
        print(f"  query              {q_ms:8.1f} ms   ({len(reply['inventories'])} VMs with full inventories)")
        print(f"  count=true         {c_ms:8.1f} ms   (total {creply['total']})")
        print(f"  count=true, all    {a_ms:8.1f} ms   (state=Running only: total {areply['total']})")
        print()
        ok_all = (
            ok / run["elapsed"] >= 100
            and pct(lat, 0.99) < 5
            and (pid is None or peak < 500 << 20)
            and q_ms < 50
            and c_ms < 20
            and not run["errors"]
        )
        print(
            "targets (>=100 VMs/s, p99 < 5 s, RSS < 500 MiB, query < 50 ms, count < 20 ms, no failures):",
            "met" if ok_all else "MISSED",
        )
        return 0
    finally:
        await c.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an already running management node (its simulator agent must be up)")
    p.add_argument("--server-pid", type=int, default=None, help="with --url: the pid whose RSS to sample")
    p.add_argument("--agent-pid", type=int, default=None, help="with --url: the simulator agent's pid (CPU figures)")
    p.add_argument("--vms", type=int, default=10000)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--hosts", type=int, default=100)
    p.add_argument("--poll", type=float, default=0.5, help="longest wait between two result polls of a job (s)")
    p.add_argument("--runs", type=int, default=20, help="runs of each timed query (the median is printed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir and logs")
    args = p.parse_args()
    # a SIGTERM ends the run like Ctrl-C: the server and agent this script started go with it
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    procs: Processes | None = None
    if not args.url:
        procs = Processes(Path(tempfile.mkdtemp(prefix="nimbo-bench-")))
    try:
        if procs is not None:
            procs.start()
        return asyncio.run(bench(args, procs))
    finally:
        if procs is not None:
            procs.close(args.keep)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
