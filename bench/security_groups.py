"""Security groups: how long a host takes to load its rules, and a rule change to take effect.

    .venv/bin/python bench/security_groups.py                 # 200 NICs, 1,000 rules, 100 changes
    .venv/bin/python bench/security_groups.py --nics 400 --rules-per-nic 5 --changes 200

An in-process management node (SQLite) and simulator agent (``nimbostack.harness``) with one
simulated host whose SecurityGroup service is real: its ``/sg/apply`` runs ``nft -f`` on this
machine (a table of its own, removed at the end). ``--nics`` VMs are made through the API, put
``--per-group`` to a group, each group with ``--rules-per-nic`` rules, so the host enforces
nics x rules-per-nic rule lines (1,000 by default).

Figures:

* the host's whole table (what a host reconnect or agent restart loads): the management node's
  query, the agent command and its ``nft -f``, and the ``nft -f`` of that file alone (median of
  10); target < 1 s;
* a rule change taking effect: ``AddSecurityGroupRule`` / ``DeleteSecurityGroupRule`` over the
  HTTP API, from the call to its answer, which comes when the host applied it (one nft
  transaction); p50/p99 over ``--changes`` changes; target < 200 ms.

Needs root and nft; this is not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nimbostack.harness import Api, Running
from nimbostack.plugins.security_group import service
from nimbostack.plugins.security_group.host.service import SgService

TABLE = "nbsg_bench"


def zone(api: Api, vms: int) -> dict[str, Any]:
    z = api.call("CreateZone", name="z")["inventory"]["uuid"]
    c = api.call("CreateCluster", name="c", zoneUuid=z, hypervisorType="Simulator")["inventory"]["uuid"]
    ps = api.call("AddLocalPrimaryStorage", name="ps", url="/nimbo/ps", zoneUuid=z)["inventory"]["uuid"]
    api.call("AttachPrimaryStorageToCluster", primaryStorageUuid=ps, clusterUuid=c)
    host = api.call("AddSimulatorHost", name="h", managementIp="10.0.0.1", clusterUuid=c,
                    cpuCapacity=vms * 100 + 1000, memoryCapacity=(vms + 8) << 27)["inventory"]["uuid"]
    bs = api.call("AddSimulatorBackupStorage", name="bs", url="/nimbo/bs")["inventory"]["uuid"]
    api.call("AttachBackupStorageToZone", backupStorageUuid=bs, zoneUuid=z)
    image = api.call("AddImage", name="i", url="http://example.invalid/i.qcow2", format="qcow2",
                     backupStorageUuids=[bs])["inventory"]["uuid"]
    l2 = api.call("CreateL2NoVlanNetwork", name="l2", zoneUuid=z, physicalInterface="eth0")["inventory"]["uuid"]
    api.call("AttachL2NetworkToCluster", l2NetworkUuid=l2, clusterUuid=c)
    l3 = api.call("CreateL3Network", name="l3", l2NetworkUuid=l2)["inventory"]["uuid"]
    api.call("AddIpRange", l3NetworkUuid=l3, name="r", startIp="198.18.0.10", endIp="198.18.15.250",
             netmask="255.255.240.0", gateway="198.18.0.1")
    services: dict[str, list[str]] = {}
    for ptype, svc in (("Flat", ["DHCP"]), ("SecurityGroup", ["SecurityGroup"])):
        nsp = api.query("QueryNetworkServiceProvider", ("type", "=", ptype))[0]["uuid"]
        api.call("AttachNetworkServiceProviderToL2Network", l2NetworkUuid=l2, networkServiceProviderUuid=nsp)
        services[nsp] = svc
    api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3, networkServices=services)
    offering = api.call("CreateInstanceOffering", name="o", cpuNum=1, cpuSpeed=1,
                        memorySize=1 << 27)["inventory"]["uuid"]
    return {"host": host, "image": image, "l3": l3, "offering": offering}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nics", type=int, default=200)
    ap.add_argument("--rules-per-nic", type=int, default=5)
    ap.add_argument("--per-group", type=int, default=5, help="NICs in each group")
    ap.add_argument("--changes", type=int, default=100)
    args = ap.parse_args()
    nft = shutil.which("nft", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if nft is None or os.geteuid() != 0:
        sys.exit("needs root and nft (apt-get install nftables)")
    root = Path(tempfile.mkdtemp(prefix="nimbo-sg-bench-"))
    node = Running(root / "data")
    agent = node.agent_server.agent
    real = SgService(agent, table=TABLE, state_dir=root / "sg", real=True)
    agent.extensions["security_group"] = real
    try:
        api = Api(node.url)
        api.login()
        env = zone(api, args.nics)
        t = time.perf_counter()
        nics = []
        for i in range(args.nics):
            vm = api.call("CreateVmInstance", name=f"vm{i}", imageUuid=env["image"],
                          instanceOfferingUuid=env["offering"], l3NetworkUuids=[env["l3"]])["inventory"]
            nics.append(vm["vmNics"][0]["uuid"])
        print(f"{args.nics} VMs made in {time.perf_counter() - t:.1f} s")
        groups = []
        for g in range(0, args.nics, args.per_group):
            sg = api.call("CreateSecurityGroup", name=f"g{g}")["inventory"]["uuid"]
            api.call("AttachSecurityGroupToL3Network", securityGroupUuid=sg, l3NetworkUuid=env["l3"])
            rules = [{"type": "Ingress" if r % 2 == 0 else "Egress", "protocol": "TCP", "startPort": 1000 + r,
                      "endPort": 1000 + r, "allowedCidr": f"198.18.{r}.0/24"} for r in range(args.rules_per_nic)]
            api.call("AddSecurityGroupRule", securityGroupUuid=sg, rules=rules)
            api.call("AddVmNicToSecurityGroup", securityGroupUuid=sg, vmNicUuids=nics[g:g + args.per_group])
            groups.append(sg)
        total = args.nics * args.rules_per_nic
        # the whole table, as a host reconnect (or an agent restart) loads it
        loads = []
        for _ in range(5):
            t = time.perf_counter()
            node.run(service.on_host_connect(node.platform, env["host"]))
            loads.append(time.perf_counter() - t)
        listed = subprocess.run([nft, "list", "table", "bridge", TABLE], capture_output=True, text=True).stdout
        chains = listed.count("\n\tchain ")
        path = root / "full.nft"
        path.write_text(real.last_file)
        alone = []
        for _ in range(10):
            t = time.perf_counter()
            subprocess.run([nft, "-f", str(path)], check=True)
            alone.append(time.perf_counter() - t)
        print(f"host table: {args.nics} NICs, {total} rules, {chains} chains, {len(real.last_file.splitlines())} "
              f"nft statements")
        print(f"  whole table (node query + /sg/apply + nft -f): median {statistics.median(loads) * 1000:.0f} ms, "
              f"max {max(loads) * 1000:.0f} ms  (target < 1000 ms)")
        print(f"  nft -f of that file alone: median {statistics.median(alone) * 1000:.0f} ms")
        # rule changes: each answer comes once the host applied it
        sg = groups[0]
        lat = []
        added: list[str] = []
        for i in range(args.changes):
            t = time.perf_counter()
            if i % 2 == 0:
                rule = {"type": "Ingress", "protocol": "UDP", "startPort": 2000 + i, "endPort": 2000 + i,
                        "allowedCidr": "198.18.0.0/15"}
                out = api.call("AddSecurityGroupRule", securityGroupUuid=sg, rules=[rule])["inventory"]
                added = [r["uuid"] for r in out["rules"] if r["protocol"] == "UDP"]
            else:
                api.call("DeleteSecurityGroupRule", ruleUuids=added)
            lat.append(time.perf_counter() - t)
        after = subprocess.run([nft, "list", "table", "bridge", TABLE], capture_output=True, text=True).stdout
        assert "udp dport 2" not in after, "the last change (a delete) did not reach nft"
        print(f"rule change taking effect ({args.changes} changes, group of {args.per_group} NICs, one nft "
              f"transaction each): p50 {pct(lat, 50) * 1000:.0f} ms, p99 {pct(lat, 99) * 1000:.0f} ms "
              "(target < 200 ms)")
    finally:
        subprocess.run([nft, "delete", "table", "bridge", TABLE], capture_output=True)
        node.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
