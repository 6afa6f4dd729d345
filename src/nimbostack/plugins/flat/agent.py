"""What the Flat plugin gives the host agent: the ``/flat/*`` commands (``host/commands.py``)."""

from __future__ import annotations

from nimbostack.agent.plugins import AgentPlugin
from nimbostack.plugins.flat.host import commands

AGENT = AgentPlugin(name="flat", commands=(commands,))
