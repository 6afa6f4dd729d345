"""Work proportional to what changed: an operation on one L3 network, one host, one VM or one tag
costs the same number of agent calls and SQL statements in a zone of 10 simulated hosts as in one
of 1,000. Counted, not timed: SQLAlchemy's ``before_cursor_execute`` on the node's engine and a
wrapper round the node's agent client."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event

from tests.conftest import Api, Running, _fresh_postgres, build_zone

ZONES = (10, 1000)


class Meter:
    """Agent calls (by path) and SQL statements the node runs inside ``measure``."""

    def __init__(self, node: Running) -> None:
        self.sql = 0
        self.calls: Counter[str] = Counter()
        self.on = False
        self.last = time.monotonic()
        db = node.platform.db
        engine = db.sync_engine if db.is_sqlite else db.engine.sync_engine
        event.listen(engine, "before_cursor_execute", self._statement)
        agents = node.platform.agents
        real = agents.call

        async def counted(url: str, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
            if self.on:
                self.calls[path] += 1
            return await real(url, path, body, timeout)

        agents.call = counted

    def _statement(self, *_: Any) -> None:
        self.last = time.monotonic()
        if self.on:
            self.sql += 1

    def _quiet(self, seconds: float = 0.3) -> None:
        """Work an operation leaves running after its reply (a job's end, an event) belongs to it,
        not to the next one: under CI's load it can land a window late unless the node is let
        settle on both sides."""
        deadline = time.monotonic() + 10
        while time.monotonic() - self.last < seconds and time.monotonic() < deadline:
            time.sleep(0.05)

    @contextmanager
    def measure(self, out: dict[str, tuple[int, dict[str, int]]], name: str) -> Iterator[None]:
        self._quiet()
        self.sql, self.calls, self.on = 0, Counter(), True
        try:
            yield
            self._quiet()
        finally:
            self.on = False
            out[name] = (self.sql, dict(self.calls))


def _vm(api: Api, env: dict[str, Any], name: str, l3: str) -> dict[str, Any]:
    return api.call("CreateVmInstance", name=name, imageUuid=env["image"]["uuid"],
                    instanceOfferingUuid=env["offering"]["uuid"], l3NetworkUuids=[l3])["inventory"]


def _l3(api: Api, env: dict[str, Any], name: str, third: int) -> dict[str, Any]:
    l3 = api.call("CreateL3Network", name=name, l2NetworkUuid=env["l2"]["uuid"])["inventory"]
    api.call("AddIpRange", l3NetworkUuid=l3["uuid"], name="r", startIp=f"198.19.{third}.10",
             endIp=f"198.19.{third}.200", netmask="255.255.255.0", gateway=f"198.19.{third}.1")
    return l3


def _operations(node: Running, hosts: int) -> dict[str, tuple[int, dict[str, int]]]:
    api = Api(node.url)
    api.login()
    env = build_zone(api, hosts=hosts)
    flat = {env["flat"]["uuid"]: ["DHCP", "Userdata"]}
    meter = Meter(node)
    out: dict[str, tuple[int, dict[str, int]]] = {}
    # warm: the first VM takes the L3's DHCP server IP and fills statement caches
    _vm(api, env, "warm", env["l3"]["uuid"])
    l3a = _l3(api, env, "a", 1)
    with meter.measure(out, "AttachNetworkServiceToL3Network (no VM)"):
        api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3a["uuid"], networkServices=flat)
    with meter.measure(out, "CreateVmInstance"):
        vm = _vm(api, env, "vm", l3a["uuid"])
    with meter.measure(out, "DetachNetworkServiceFromL3Network (one VM)"):
        api.call("DetachNetworkServiceFromL3Network", l3NetworkUuid=l3a["uuid"], networkServices=flat)
    with meter.measure(out, "AttachNetworkServiceToL3Network (one VM)"):
        api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3a["uuid"], networkServices=flat)
    with meter.measure(out, "CreateSystemTag on a VM"):
        api.call("CreateSystemTag", resourceType="VmInstanceVO", resourceUuid=vm["uuid"], tag="hostname::web1")
    with meter.measure(out, "CreateUserTag on an L3"):
        api.call("CreateUserTag", resourceType="L3NetworkVO", resourceUuid=l3a["uuid"], tag="tier-web")
    with meter.measure(out, "ReconnectHost (one VM)"):
        api.call("ReconnectHost", uuid=vm["hostUuid"])
    busy = {v["hostUuid"] for v in api.query("QueryVmInstance")}
    empty = next(h["uuid"] for h in env["hosts"] if h["uuid"] not in busy)
    with meter.measure(out, "ReconnectHost (no VM)"):
        api.call("ReconnectHost", uuid=empty)
    l3b = _l3(api, env, "b", 2)
    api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3b["uuid"], networkServices=flat)
    gone = _vm(api, env, "gone", l3b["uuid"])
    api.call("DestroyVmInstance", uuid=gone["uuid"])
    api.call("ExpungeVmInstance", uuid=gone["uuid"])
    with meter.measure(out, "DeleteL3Network"):
        api.call("DeleteL3Network", uuid=l3b["uuid"])
    # the host (re)connect leaves the host's capacity right: O(1) does not mean skipped
    host = api.query("QueryHost", ("uuid", "=", vm["hostUuid"]))[0]
    running = api.query("QueryVmInstance", ("hostUuid", "=", host["uuid"]), ("state", "=", "Running"))
    assert host["availableMemoryCapacity"] == host["totalMemoryCapacity"] - len(running) * (128 << 20)
    return out


def _zone(tmp: Path, hosts: int) -> dict[str, tuple[int, dict[str, int]]]:
    db = os.environ.get("NIMBOSTACK_TEST_DB")
    node = Running(tmp / f"data{hosts}", _fresh_postgres(db) if db else None)
    try:
        return _operations(node, hosts)
    finally:
        node.stop()


def test_work_does_not_grow_with_the_hosts(tmp_path: Path) -> None:
    small, large = (_zone(tmp_path, n) for n in ZONES)
    report = "\n".join(f"{k}: {small[k]} -> {large[k]}" for k in small)
    print(report)
    for name, (sql, calls) in small.items():
        big_sql, big_calls = large[name]
        assert big_calls == calls, f"{name}: agent calls grew with the hosts\n{report}"
        # which host the allocator picks (one already carrying the L3 or not) moves a count by a few
        # statements either way; work per host would add hundreds at 1,000 hosts
        assert big_sql <= sql + 5, f"{name}: SQL statements grew with the hosts\n{report}"
    # the attach/detach reached the one host that carries the L3 network, not every host
    assert sum(large["AttachNetworkServiceToL3Network (one VM)"][1].values()) <= 3, report
    assert sum(large["AttachNetworkServiceToL3Network (no VM)"][1].values()) == 0, report
    assert sum(large["DeleteL3Network"][1].values()) == 0, report


def _fault(node: Running, host: str, path: str, **kind: Any) -> None:
    assert node.agent_call("/simulator/fault", {"hostUuid": host, "path": path, **kind})["success"]


def _statuses(api: Api) -> dict[str, str]:
    return {h["uuid"]: h["status"] for h in api.query("QueryHost")}


def test_pings_are_one_request_per_agent_endpoint(node: Running, api: Api) -> None:
    from nimbostack.compute.host import ping_all

    env = build_zone(api, hosts=5)
    hosts = [h["uuid"] for h in env["hosts"]]
    meter = Meter(node)
    rounds: dict[str, tuple[int, dict[str, int]]] = {}
    with meter.measure(rounds, "all answer"):
        node.run(ping_all(node.platform))
    assert rounds["all answer"][1] == {"/host/ping-batch": 1}
    assert set(_statuses(api).values()) == {"Connected"}

    # one lost answer is retried (a second batch, of that host alone) and is not a lost host
    _fault(node, hosts[0], "/host/ping", unreachable=True, times=1)
    with meter.measure(rounds, "one lost answer"):
        node.run(ping_all(node.platform))
    assert rounds["one lost answer"][1] == {"/host/ping-batch": 2}
    assert set(_statuses(api).values()) == {"Connected"}

    # a host missing from both answers goes Disconnected, alone; answering again, it reconnects
    _fault(node, hosts[1], "/host/ping", unreachable=True, times=2)
    node.run(ping_all(node.platform))
    status = _statuses(api)
    assert status.pop(hosts[1]) == "Disconnected"
    assert set(status.values()) == {"Connected"}
    node.run(ping_all(node.platform))
    assert _statuses(api)[hosts[1]] == "Connected"

    # a host that fails (an error rather than silence) is as lost
    _fault(node, hosts[2], "/host/ping", error="boom", times=2)
    node.run(ping_all(node.platform))
    assert _statuses(api)[hosts[2]] == "Disconnected"
    node.run(ping_all(node.platform))

    # the endpoint down: every host it serves goes Disconnected; back up, they all reconnect
    _fault(node, "*", "/host/ping-batch", unreachable=True, times=2)
    node.run(ping_all(node.platform))
    assert set(_statuses(api).values()) == {"Disconnected"}
    with meter.measure(rounds, "back"):
        node.run(ping_all(node.platform))
    assert set(_statuses(api).values()) == {"Connected"}
    assert rounds["back"][1]["/host/ping-batch"] == 1
    assert rounds["back"][1]["/host/connect"] == len(hosts)


def test_an_endpoint_of_one_host_gets_its_own_ping(node: Running, api: Api) -> None:
    """A KVM agent serves one host: it is pinged as ever (``/host/ping``), not batched."""
    from nimbostack.compute.host import ping_all

    build_zone(api, hosts=1)
    meter = Meter(node)
    rounds: dict[str, tuple[int, dict[str, int]]] = {}
    with meter.measure(rounds, "one"):
        node.run(ping_all(node.platform))
    assert rounds["one"][1] == {"/host/ping": 1}


def test_eip_rules_follow_a_public_l3_delete_and_an_eip_service_detach(node: Running, api: Api) -> None:
    """The hosts an L3's change reaches include those of VMs whose EIP takes its VIP from it
    (read before the delete takes the VIPs and EIPs with it), and no other host."""
    from tests.integration.test_flat_network import eip_state, public_l3

    env = build_zone(api, hosts=3)
    l3, flat = env["l3"]["uuid"], env["flat"]["uuid"]
    api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3, networkServices={flat: ["Eip"]})
    meter = Meter(node)
    out: dict[str, tuple[int, dict[str, int]]] = {}
    for round_ in ("detach", "delete"):
        pub = public_l3(api, env) if round_ == "detach" else public_l3_again(api, env)
        vm = _vm(api, env, f"vm-{round_}", l3)
        vip = api.call("CreateVip", name="vip", l3NetworkUuid=pub["uuid"])["inventory"]
        api.call("CreateEip", name="eip", vipUuid=vip["uuid"], vmNicUuid=vm["vmNics"][0]["uuid"])
        assert list(eip_state(node, vm["hostUuid"])) == [vip["uuid"]]
        with meter.measure(out, round_):
            if round_ == "detach":
                api.call("DetachNetworkServiceFromL3Network", l3NetworkUuid=l3, networkServices={flat: ["Eip"]})
            else:
                api.call("DeleteL3Network", uuid=pub["uuid"])
        assert eip_state(node, vm["hostUuid"]) == {}
        assert out[round_][1].get("/flat/eip/sync") == 1  # the VM's host alone
        if round_ == "detach":
            api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3, networkServices={flat: ["Eip"]})
            assert list(eip_state(node, vm["hostUuid"])) == [vip["uuid"]]
            api.call("DeleteEip", uuid=api.query("QueryEip")[0]["uuid"])
            api.call("DeleteL3Network", uuid=pub["uuid"])


def public_l3_again(api: Api, env: dict[str, Any]) -> dict[str, Any]:
    l2 = api.query("QueryL2Network", ("name", "=", "pub"))[0]
    pub = api.call("CreateL3Network", name="public2", l2NetworkUuid=l2["uuid"])["inventory"]
    api.call("AddIpRange", l3NetworkUuid=pub["uuid"], name="pub2", startIp="198.19.5.10", endIp="198.19.5.200",
             netmask="255.255.255.0", gateway="198.19.5.1")
    return pub
