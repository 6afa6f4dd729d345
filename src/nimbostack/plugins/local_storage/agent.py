"""What the LocalStorage plugin gives the host agent: the storage commands under its prefix, each
host keeping its own share."""

from __future__ import annotations

from nimbostack.agent.plugins import AgentPlugin

AGENT = AgentPlugin(name="local_storage", storage_kinds={"/storage/local": False})
