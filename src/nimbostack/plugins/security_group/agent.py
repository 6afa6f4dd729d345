"""What the SecurityGroup plugin gives the host agent: the ``/sg/*`` commands (``host/commands.py``)."""

from __future__ import annotations

from nimbostack.agent.plugins import AgentPlugin
from nimbostack.plugins.security_group.host import commands

AGENT = AgentPlugin(name="security_group", commands=(commands,))
