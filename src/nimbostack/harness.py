"""An all-in-one in one process (a management node and an agent on loopback ports) and a small
ZStack wire client: what the benchmarks and the tests drive, over HTTP exactly as any client would."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from nimbostack.api.app import create_app
from nimbostack.core import spec
from nimbostack.core.platform import Settings
from nimbostack.db.engine import sqlite_url
from nimbostack.main import agent_app, local_agent_credentials

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port below the kernel's ephemeral range, free now and not handed out before in this process.

    A port the kernel picks for ``bind(0)`` comes from the ephemeral range, where any outgoing
    connection (an httpx client, a libvirt or PostgreSQL socket) may take it as its local port
    before the server binds it: CI saw "address already in use" that way. Below the range only
    listeners bind, so a port free now stays free until the server takes it."""
    low = 20000
    try:
        low_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low_ephemeral = 32768
    high = max(low + 1000, low_ephemeral)
    for _ in range(200):
        port = random.randrange(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{high}")


def wait_for(predicate: Any, timeout: float, what: str, every: float = 0.2) -> Any:
    """The first true value of ``predicate()``, asked every ``every`` s; fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class ApiError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(json.dumps(error))
        self.code = error.get("code")
        self.error = error


class Api:
    """A small ZStack wire client: call("CreateZone", name="z") → the reply body."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = httpx.Client(timeout=120)
        self.session: str | None = None

    def raw(self, name: str, params: dict[str, Any], session: bool = True) -> dict[str, Any]:
        full = spec.messages()[name].full_name if name in spec.messages() else name
        body = dict(params)
        if session and self.session:
            body["session"] = {"uuid": self.session}
        r = self.http.post(f"{self.base}/zstack/api", json={full: body})
        assert r.status_code == 200, r.text
        answer = r.json()
        while answer["state"] == "Processing":
            time.sleep(0.02)
            answer = self.http.get(f"{self.base}/zstack/api/result/{answer['uuid']}").json()
        (reply,) = json.loads(answer["result"]).values()
        return reply

    def call(self, name: str, /, **params: Any) -> dict[str, Any]:
        reply = self.raw(name, params)
        if not reply["success"]:
            raise ApiError(reply["error"])
        return reply

    def fails(self, name: str, /, **params: Any) -> dict[str, Any]:
        reply = self.raw(name, params)
        assert not reply["success"], f"{name} should have failed: {reply}"
        return reply["error"]

    def login(self, name: str = "admin", password: str = "password") -> str:
        reply = self.call("LogInByAccount", accountName=name, password=hashlib.sha512(password.encode()).hexdigest())
        self.session = reply["inventory"]["uuid"]
        return self.session

    def query(self, name: str, /, *conds: tuple[str, str, Any], **params: Any) -> list[dict[str, Any]]:
        conditions = [{"name": n, "op": op, "value": v} for n, op, v in conds]
        return self.call(name, conditions=conditions, **params)["inventories"]


class Running:
    """A management node + simulator agent in a background thread's event loop."""

    def __init__(
        self,
        data_dir: Path,
        db_url: str | None = None,
        quick_wait: float = 0.2,
        port: int | None = None,
        agent_port: int | None = None,
        background: bool = False,
        driver: str = "simulator",
        listen: str = "127.0.0.1",
    ) -> None:
        """``port``/``agent_port`` reuse a stopped node's ports (a restart on the same data dir);
        ``background`` runs the pings, the expunger and the GC poll; ``driver`` "libvirt" makes the
        agent a real KVM host agent; ``listen`` is the management node's address (agents on other
        machines push their events there)."""
        self.db_url = db_url
        self.port, self.agent_port = port or free_port(), agent_port or free_port()
        self.wire_port = free_port()
        settings = Settings(
            data_dir=data_dir,
            db_url=db_url or sqlite_url(data_dir),
            port=self.port,
            host=listen,
            management_url=f"http://{listen}:{self.port}",
            wire_port=self.wire_port,
            simulator_agent_url=f"https://127.0.0.1:{self.agent_port}",
            quick_wait=quick_wait,
            background=background,
        )
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.app = create_app(settings)
        agent_dir = data_dir / "agent"
        creds = local_agent_credentials(data_dir, agent_dir, self.agent_port)
        self.agent_server = agent_app(driver, "auto", "127.0.0.1", str(agent_dir), creds)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=listen, port=self.port, log_level="warning"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the management node did not start")
            time.sleep(0.05)
        self.url = f"http://{listen}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]

        async def both() -> None:
            await self.agent_server.start("127.0.0.1", self.agent_port)
            try:
                await self.server.serve()
            finally:
                await self.agent_server.stop()

        self.loop.run_until_complete(both())

    def node_tls(self) -> ssl.SSLContext:
        """The management node's client context: what a test uses to speak to agents as the node."""
        return self.platform.credentials.client_context()  # type: ignore[no-any-return]

    def agent_call(self, path: str, body: dict[str, Any], port: int | None = None) -> dict[str, Any]:
        """A command to an agent (this node's, or the one on ``port``) as the management node sends it."""
        url = f"https://127.0.0.1:{port or self.agent_port}{path}"
        return httpx.post(url, json=body, timeout=30, verify=self.node_tls()).json()  # type: ignore[no-any-return]

    @property
    def platform(self) -> Any:
        return self.app.wire.platform

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
