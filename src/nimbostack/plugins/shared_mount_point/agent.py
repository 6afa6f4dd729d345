"""What the SharedMountPoint plugin gives the host agent: the storage commands under its prefix,
on the one file system every host has mounted."""

from __future__ import annotations

from nimbostack.agent.plugins import AgentPlugin

AGENT = AgentPlugin(name="shared_mount_point", storage_kinds={"/storage/smp": True})
