"""First start of the all-in-one: give the operator a zone with this machine as a host, its local
primary storage and a backup storage, through the same API any client uses."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import httpx

from nimbostack.core import spec

log = logging.getLogger(__name__)


class _Client:
    def __init__(self, base: str) -> None:
        self.base = base
        self.http = httpx.AsyncClient(timeout=600)
        self.session: str | None = None

    async def call(self, name: str, /, **params: Any) -> dict[str, Any]:
        import asyncio

        body = {
            spec.messages()[name].full_name: {**params, **({"session": {"uuid": self.session}} if self.session else {})}
        }
        answer = (await self.http.post(f"{self.base}/zstack/api", json=body)).json()
        while answer["state"] == "Processing":
            await asyncio.sleep(0.2)
            answer = (await self.http.get(f"{self.base}/zstack/api/result/{answer['uuid']}")).json()
        (reply,) = json.loads(answer["result"]).values()
        if not reply["success"]:
            err = reply["error"]
            raise RuntimeError(f"{name}: {err['description']}: {err['details']}")
        return reply


async def bootstrap(api_url: str, data_dir: Path, hypervisor: str, agent_port: int) -> None:
    """Create the default zone once; later starts find it and do nothing."""
    c = _Client(api_url)
    try:
        login = await c.call("LogInByAccount", accountName="admin", password=hashlib.sha512(b"password").hexdigest())
        c.session = login["inventory"]["uuid"]
        zones = (await c.call("QueryZone", conditions=[]))["inventories"]
        if zones:
            return
        zone = (await c.call("CreateZone", name="zone-1", description="all-in-one"))["inventory"]["uuid"]
        cluster = (await c.call("CreateCluster", name="cluster-1", zoneUuid=zone, hypervisorType=hypervisor))[
            "inventory"
        ]["uuid"]
        ps = (await c.call("AddLocalPrimaryStorage", name="local-ps", zoneUuid=zone, url=str(data_dir / "primary")))[
            "inventory"
        ]["uuid"]
        await c.call("AttachPrimaryStorageToCluster", primaryStorageUuid=ps, clusterUuid=cluster)
        tags = [f"agentPort::{agent_port}"]
        if hypervisor == "KVM":
            await c.call(
                "AddKVMHost",
                name="host-1",
                managementIp="127.0.0.1",
                username="root",
                password="unused",
                clusterUuid=cluster,
                systemTags=tags,
            )
        else:
            await c.call(
                "AddSimulatorHost",
                name="host-1",
                managementIp="127.0.0.1",
                clusterUuid=cluster,
                cpuCapacity=8 * 2600,
                memoryCapacity=16 << 30,
            )
        bs = (
            await c.call(
                "AddSftpBackupStorage",
                name="local-bs",
                hostname="127.0.0.1",
                username="root",
                password="unused",
                url=str(data_dir / "backup"),
                systemTags=tags,
            )
        )["inventory"]["uuid"]
        await c.call("AttachBackupStorageToZone", backupStorageUuid=bs, zoneUuid=zone)
        log.info("bootstrap: zone-1 with host-1 (%s), local primary storage and backup storage created", hypervisor)
    finally:
        await c.http.aclose()
