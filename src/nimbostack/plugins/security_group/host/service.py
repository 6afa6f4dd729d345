"""The host side of the SecurityGroup provider: one ``bridge`` nftables table of per-NIC chains.

Every change is one ``nft -f`` of a generated file, which the kernel applies as one transaction:
all of it or, on any error, none (the table stays as it was and the command fails). Which VM each
chain belongs to is kept in ``applied.json`` in the state directory, so that an agent restarted
between two commands still removes a VM's chains by the VM's uuid. The chains themselves live in
the kernel and keep filtering while the agent is down; the management node sends the whole table
again when the host reconnects. In simulator mode (``Agent.multi_host``) nothing is touched: each
simulated host's NICs are recorded for management-plane tests."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nimbostack.agent.driver import DriverError
from nimbostack.plugins.security_group.host import render

_CT_PROBE = (
    "table bridge {t}\ndelete table bridge {t}\ntable bridge {t} {{\n"
    "  chain forward {{ type filter hook forward priority 0; policy accept; ct state established return; }}\n}}\n"
)


def _tool(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin")


async def _nft(nft: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        nft, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, (out + err).decode(errors="replace").strip()


class SgService:
    def __init__(
        self, agent: Any, table: str = "nimbo_sg", state_dir: str | Path = "/run/nimbostack/sg", real: bool = False
    ) -> None:
        """``real``: nft even on the simulator agent (a benchmark of the whole path on one machine)."""
        if not render.TABLE.fullmatch(table):
            raise ValueError(f"table {table!r} must be [a-z][a-z0-9_]*")
        self.agent = agent
        self.real = real
        self.table = table
        self.state_dir = Path(state_dir)
        self.simulated: dict[str, dict[str, dict[str, Any]]] = {}  # host -> nic uuid -> entry
        self.lock = asyncio.Lock()
        self.stateful: bool | None = None  # conntrack in the bridge family; probed once
        self._owners: dict[str, str] | None = None  # tap -> vm uuid of the chains in the table
        self.last_file = ""

    @property
    def simulate(self) -> bool:
        return not self.real and bool(getattr(self.agent, "multi_host", False))

    # --- commands ---------------------------------------------------------------------------

    async def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        a = render.parse(body)
        if self.simulate:
            return self._apply_simulated(a)
        nft = _tool("nft")
        if nft is None:
            raise DriverError("SG_TOOLS_MISSING", "the host lacks nft (nftables), which security groups need")
        async with self.lock:
            owners = {} if a.full else dict(self._load_owners())
            keep = {n.tap for n in a.nics}
            remove = set(a.remove) | {tap for tap, vm in owners.items() if vm in a.vm_uuids and tap not in keep}
            stateful = await self._stateful(nft)
            text = render.render(self.table, a.nics, tuple(sorted(remove)), a.full, stateful)
            await self._load_file(nft, text)
            for tap in remove:
                owners.pop(tap, None)
            owners.update({n.tap: n.vm_uuid for n in a.nics})
            self._save_owners(owners)
        return {
            "nics": len(a.nics),
            "removed": len(remove) if not a.full else 0,
            "stateful": stateful,
            "elapsedMs": round((time.perf_counter() - started) * 1000, 2),
        }

    def _apply_simulated(self, a: render.Apply) -> dict[str, Any]:
        have = self.simulated.setdefault(a.host_uuid, {})
        if a.full:
            have.clear()
        keep = {n.nic_uuid for n in a.nics}
        gone = {u for u, e in have.items() if e["vmUuid"] in a.vm_uuids and u not in keep}
        gone |= {u for u in have if render.Nic(u, "", (), ()).tap in a.remove}
        for u in gone:
            have.pop(u)
        for n in a.nics:
            have[n.nic_uuid] = {
                "vmUuid": n.vm_uuid,
                "ingress": [asdict(r) for r in n.ingress],
                "egress": [asdict(r) for r in n.egress],
            }
        return {"simulated": True, "nics": len(a.nics), "removed": len(gone)}

    async def state(self, host_uuid: str) -> dict[str, Any]:
        if self.simulate:
            return {"nics": copy.deepcopy(self.simulated.get(host_uuid, {}))}
        nft = _tool("nft")
        text = ""
        if nft is not None:
            rc, out = await _nft(nft, "list", "table", "bridge", self.table)
            text = out if rc == 0 else ""
        return {"owners": dict(self._load_owners()), "ruleset": text}

    async def close(self) -> None:
        """Nothing to stop: the chains keep filtering while the agent is away."""

    # --- real hosts -------------------------------------------------------------------------

    async def _stateful(self, nft: str) -> bool:
        if self.stateful is None:
            probe = f"{self.table}_ctprobe"[:32]
            rc, _ = await _nft(nft, "-c", "-f", str(self._write("ct-probe.nft", _CT_PROBE.format(t=probe))))
            self.stateful = rc == 0
        return self.stateful

    def _write(self, name: str, text: str) -> Path:
        path = self.state_dir / name
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as err:
            raise DriverError("SG_STATE_DIR_FAILED", "cannot write the security group state", str(err)) from None
        return path

    async def _load_file(self, nft: str, text: str) -> None:
        path = self._write("apply.nft", text)
        self.last_file = text
        rc, out = await _nft(nft, "-f", str(path))
        if rc:
            raise DriverError("SG_NFT_FAILED", "nft refused the security group rules; nothing changed", out[:500])

    def _load_owners(self) -> dict[str, str]:
        if self._owners is None:
            try:
                raw = json.loads((self.state_dir / "applied.json").read_text())
                self._owners = {str(k): str(v) for k, v in raw.get("owners", {}).items()}
            except (OSError, ValueError, AttributeError):
                self._owners = {}
        return self._owners

    def _save_owners(self, owners: dict[str, str]) -> None:
        self._write("applied.json", json.dumps({"table": self.table, "owners": owners}, sort_keys=True))
        self._owners = owners
