"""Boot time of real VMs through the whole platform, and the management plane's share of it.

Starts a management node and a libvirt agent (this machine as a KVM host; QEMU/TCG where KVM does
not work), a Flat L3 network and the tiny guest (images/build-tiny), then for 1 and for N VMs in
parallel measures from CreateVmInstance accepted to:
  - Running (the API's answer),
  - the guest's first console line (NIMBO-BOOT),
  - the guest holding its DHCP lease and having fetched its userdata (NIMBO-USERDATA-END).
The management-plane overhead is the API time minus what the agent spent in libvirt's define+start
(the agent's /vm/start) and in qemu-img (/storage/local/create-root).

Usage: .venv/bin/python bench/vm_boot.py [--parallel 10] [--image-dir build/tiny-image]
Needs root and a running libvirtd (scripts/start-libvirtd).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

from nimbostack.harness import Api, Running, free_port

ROOT = Path(__file__).resolve().parents[1]

AGENT_TIMES: dict[str, list[float]] = defaultdict(list)


def time_agent_calls() -> None:
    """Record how long each agent command takes, seen from the management node."""
    from nimbostack.core import agents

    original = agents.AgentClient.call

    async def timed(self, agent_url, path, body, timeout=None):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return await original(self, agent_url, path, body, timeout)
        finally:
            AGENT_TIMES[path].append(time.perf_counter() - t0)

    agents.AgentClient.call = timed  # type: ignore[method-assign]


def setup(api: Api, node: Running, root: Path, images: Path) -> dict[str, str]:
    bridge = f"nbb{uuid.uuid4().hex[:8]}"
    zone = api.call("CreateZone", name="bench")["inventory"]["uuid"]
    cluster = api.call("CreateCluster", name="c", zoneUuid=zone, hypervisorType="KVM")["inventory"]["uuid"]
    ps = api.call("AddLocalPrimaryStorage", name="ps", zoneUuid=zone, url=str(root / "ps"))["inventory"]["uuid"]
    api.call("AttachPrimaryStorageToCluster", primaryStorageUuid=ps, clusterUuid=cluster)
    tags = [f"agentPort::{node.agent_port}"]
    api.call("AddKVMHost", name="me", managementIp="127.0.0.1", username="root", password="x", clusterUuid=cluster,
             systemTags=tags)
    bs = api.call("AddSftpBackupStorage", name="bs", hostname="127.0.0.1", username="root", password="x",
                  url=str(root / "bs"), systemTags=tags)["inventory"]["uuid"]
    api.call("AttachBackupStorageToZone", backupStorageUuid=bs, zoneUuid=zone)
    image = api.call("AddImage", name="tiny", url=str(images / "tiny.qcow2"), format="qcow2",
                     backupStorageUuids=[bs])["inventory"]["uuid"]
    l2 = api.call("CreateL2NoVlanNetwork", name="l2", zoneUuid=zone, physicalInterface="nimbonone0",
                  systemTags=[f"bridge::{bridge}"])["inventory"]["uuid"]
    api.call("AttachL2NetworkToCluster", l2NetworkUuid=l2, clusterUuid=cluster)
    l3 = api.call("CreateL3Network", name="l3", l2NetworkUuid=l2)["inventory"]["uuid"]
    api.call("AddIpRange", l3NetworkUuid=l3, name="r", startIp="198.19.9.10", endIp="198.19.9.200",
             netmask="255.255.255.0", gateway="198.19.9.1")
    flat = api.query("QueryNetworkServiceProvider", ("type", "=", "Flat"))[0]["uuid"]
    api.call("AttachNetworkServiceProviderToL2Network", l2NetworkUuid=l2, networkServiceProviderUuid=flat)
    api.call("AttachNetworkServiceToL3Network", l3NetworkUuid=l3, networkServices={flat: ["DHCP", "Userdata"]})
    offering = api.call("CreateInstanceOffering", name="o", cpuNum=1, cpuSpeed=1,
                        memorySize=128 << 20)["inventory"]["uuid"]
    return {"image": image, "l3": l3, "offering": offering, "bridge": bridge}


def boot(api: Api, env: dict[str, str], console_dir: Path, name: str) -> dict[str, float]:
    t0 = time.perf_counter()
    vm = api.call("CreateVmInstance", name=name, imageUuid=env["image"], instanceOfferingUuid=env["offering"],
                  l3NetworkUuids=[env["l3"]], systemTags=["userdata::#cloud-config\\nbench: yes"])["inventory"]
    running = time.perf_counter() - t0
    log = console_dir / f"{vm['uuid']}.log"
    marks = {"NIMBO-BOOT": None, "NIMBO-USERDATA-END": None}
    deadline = time.monotonic() + 300
    while any(v is None for v in marks.values()) and time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        for key in marks:
            if marks[key] is None and re.search(key, text):
                marks[key] = time.perf_counter() - t0
        time.sleep(0.05)
    return {"running": running, "first_line": marks["NIMBO-BOOT"] or float("nan"),
            "lease_and_userdata": marks["NIMBO-USERDATA-END"] or float("nan"), "uuid": vm["uuid"]}  # type: ignore[dict-item]


def run_batch(api: Api, env: dict[str, str], console_dir: Path, n: int) -> list[dict[str, float]]:
    out: list[dict[str, float]] = [{} for _ in range(n)]

    def one(i: int) -> None:
        client = Api(api.base)  # one HTTP client per thread
        client.session = api.session
        out[i] = boot(client, env, console_dir, f"b{n}-{i}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def libvirt_floor(template_vm: str, n: int, workdir: Path) -> tuple[float, float]:
    """libvirt alone, without the platform: wall time of 1 and of ``n`` parallel starts of copies of
    a platform VM's domain (own overlays, no NIC), started paused so no guest competes for the
    CPUs. What a start costs libvirt and QEMU themselves (libvirt 9.0 reads the guest CPU's ~400
    properties one QMP qom-get at a time) bounds what the platform can reach."""
    import libvirt

    conn = libvirt.open("qemu:///system")
    xml = conn.lookupByName(f"nimbo-{template_vm}").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    xml = re.sub(r"<interface.*?</interface>|<metadata>.*?</metadata>|<sysinfo.*?</sysinfo>|<smbios[^>]*/>", "",
                 xml, flags=re.S)
    disk = re.search(r"<source file='([^']*\.qcow2)'", xml)
    assert disk is not None
    # the copies are backed by the image the template's root volume is backed by (the VM runs)
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", disk.group(1)],
                                     capture_output=True, text=True, check=True).stdout)
    image = info["full-backing-filename"]

    def start(count: int) -> float:
        doms = []
        for _ in range(count):
            u = str(uuid.uuid4())
            overlay = workdir / f"floor-{u}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image, str(overlay)],
                           check=True)
            x = re.sub(r"<name>.*?</name>", f"<name>floor-{u}</name>", xml)
            x = re.sub(r"<uuid>.*?</uuid>", f"<uuid>{u}</uuid>", x)
            x = re.sub(r"file='[^']*\.log'", f"file='{workdir}/floor-{u}.log'", x)
            doms.append(conn.defineXML(x.replace(disk.group(1), str(overlay))))

        def go(name: str) -> None:
            own = libvirt.open("qemu:///system")
            own.lookupByName(name).createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
            own.close()

        threads = [threading.Thread(target=go, args=(d.name(),)) for d in doms]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        for d in doms:
            if d.isActive():
                d.destroy()
            d.undefine()
        return wall

    try:
        return start(1), start(n)
    finally:
        conn.close()


def summary(label: str, rows: list[dict[str, float]]) -> None:
    for key in ("running", "first_line", "lease_and_userdata"):
        values = [r[key] for r in rows]
        print(f"  {label:>12} {key:>20}: max {max(values):6.2f} s  median {statistics.median(values):6.2f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parallel", type=int, default=10)
    ap.add_argument("--image-dir", default=str(ROOT / "build" / "tiny-image"))
    a = ap.parse_args()
    images = Path(a.image_dir)
    if not (images / "tiny.qcow2").exists():
        subprocess.run([str(ROOT / "images" / "build-tiny"), str(images)], check=True)
    time_agent_calls()
    root = Path(tempfile.mkdtemp(prefix="nimbo-bench-"))
    node = Running(root / "data", driver="libvirt", agent_port=free_port())
    api = Api(node.url)
    api.login()
    env = setup(api, node, root, images)
    console_dir = root / "data" / "agent" / "console"
    try:
        one = run_batch(api, env, console_dir, 1)
        agent_one = sum(AGENT_TIMES["/vm/start"]) + sum(AGENT_TIMES["/storage/local/create-root"])
        AGENT_TIMES.clear()
        many = run_batch(api, env, console_dir, a.parallel)
        print("VM boot through the platform (tiny guest; QEMU/TCG where KVM does not work)")
        summary("1 VM", one)
        summary(f"{a.parallel} parallel", many)
        overhead = one[0]["running"] - agent_one
        print(f"  management-plane overhead for 1 VM (API time - agent's libvirt/qemu-img time): "
              f"{overhead * 1000:.0f} ms")
        ratio = max(r["running"] for r in many) / one[0]["running"]
        print(f"  {a.parallel} parallel all Running within {ratio:.1f}x the time of one")
        for path, times in sorted(AGENT_TIMES.items()):
            print(f"  agent {path:>30}: n={len(times):3d} median {statistics.median(times) * 1000:7.1f} ms")
        alone, parallel = libvirt_floor(many[0]["uuid"], a.parallel, root)
        print(f"  libvirt alone (no platform, guests paused): 1 start {alone:.2f} s, {a.parallel} parallel "
              f"{parallel:.2f} s = {parallel / alone:.1f}x")
    finally:
        for r in one + many:
            subprocess.run(["virsh", "-c", "qemu:///system", "destroy", f"nimbo-{r['uuid']}"], capture_output=True)
            subprocess.run(["virsh", "-c", "qemu:///system", "undefine", f"nimbo-{r['uuid']}"], capture_output=True)
        node.stop()
        subprocess.run(["ip", "link", "del", env["bridge"]], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
