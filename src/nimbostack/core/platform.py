"""Everything a handler needs, in one place: database, config, sessions, jobs, queues, agents."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import make_url

from nimbostack.core.agents import AgentClient
from nimbostack.core.auth import Auth
from nimbostack.core.deadline import ApiTimeouts
from nimbostack.core.events import EventBus
from nimbostack.core.globalconfig import API_TIMEOUT, GlobalConfigStore
from nimbostack.core.jobs import Jobs
from nimbostack.core.queues import SerialQueues
from nimbostack.db.engine import Database
from nimbostack.wire.pki import Authority


@dataclass
class Settings:
    data_dir: Path
    db_url: str
    port: int = 8080
    host: str = "0.0.0.0"
    # the URL agents use to push events back; derived from port when empty
    management_url: str = ""
    # where KVM host agents listen, unless a host says otherwise
    agent_port: int = 7070
    # where agents push events (mutual TLS, api/agent_wire.py), on the management URL's address
    wire_port: int = 8081
    # the simulator agent that serves every AddSimulatorHost host
    simulator_agent_url: str = "https://127.0.0.1:7071"
    quick_wait: float = 0.2
    background: bool = True  # pings, expunge, GC loops (tests may turn them off)
    max_running_jobs: int = 64  # asynchronous APIs working at once; the rest wait in arrival order
    extra: dict[str, str] = field(default_factory=dict)


def keep_private(data_dir: Path, db_url: str) -> None:
    """The data dir is the node's alone (0700), and an SQLite database file 0600 from its first
    byte: SQLite gives its -wal and -shm files the database file's mode."""
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite" and url.database:
        os.close(os.open(url.database, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(url.database, 0o600)


class Platform:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        keep_private(settings.data_dir, settings.db_url)
        self.db = Database(settings.db_url)
        self.config = GlobalConfigStore(self.db)
        self.jobs = Jobs(self.db, settings.max_running_jobs)
        self.queues = SerialQueues()
        self.timeouts = ApiTimeouts()
        self.timeouts.load(settings.data_dir / "zstack.properties")
        # UpdateGlobalConfig category=apiTimeout overrides zstack.properties
        self.timeouts.overrides = lambda: self.config.category_values(API_TIMEOUT)
        # the agent wire's CA and the node's own certificate (wire/pki.py)
        self.pki = Authority(settings.data_dir / "pki")
        self.credentials = self.pki.node_credentials(
            [urlsplit(self.management_url).hostname or "", settings.host if settings.host != "0.0.0.0" else ""])
        self.agents = AgentClient(self.credentials.client_context())
        self.auth = Auth(self.db, self.config)
        self.node_uuid = uuid.uuid4().hex  # this management node's, for its life (management_node)
        self.events = EventBus()  # what changed, for the web UI's open pages (core/events.py)

    @property
    def management_url(self) -> str:
        return self.settings.management_url or f"http://127.0.0.1:{self.settings.port}"

    @property
    def agent_wire_url(self) -> str:
        """Where agents push their events."""
        return f"https://{urlsplit(self.management_url).netloc.rsplit(':', 1)[0]}:{self.settings.wire_port}"

    async def close(self) -> None:
        await self.agents.close()
        await self.db.close()
