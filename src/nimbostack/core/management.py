"""The management plane: the management nodes that share the database (each writes its row when
it starts, renews its heartBeat while it runs and removes the row when it stops; a node that stops
beating is removed by the others), and the APIs about them: QueryManagementNode, IsReadyToGo,
GetVersion."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from importlib.metadata import version
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import delete, update

from nimbostack.core import query
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import not_allowed, not_found
from nimbostack.core.resources import register_queries
from nimbostack.db import models as m
from nimbostack.db.engine import rowcount

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 5.0  # seconds between two heartbeats of a node
# a node whose heartbeat is older than this is gone: it is not ready, and the others remove its row
HEARTBEAT_DEAD_AFTER = timedelta(seconds=6 * HEARTBEAT_INTERVAL)

query.register(
    query.QueryTarget("QueryObjectManagementNodeInventory", m.ManagementNode, "ManagementNodeInventory", scope="admin")
)
register_queries("QueryManagementNode")


def host_name(p: Platform) -> str:
    """What ZStack calls a node's hostName: the address the agents reach it at."""
    return urlsplit(p.management_url).hostname or p.settings.host


async def join(p: Platform) -> None:
    """This node's row, from its start."""
    now = datetime.utcnow()
    async with p.db.tx() as s:
        s.add(m.ManagementNode(uuid=p.node_uuid, hostName=host_name(p), joinDate=now, heartBeat=now))


async def beat(p: Platform) -> None:
    """Renew this node's heartbeat (its row again, if the others took it for dead), and remove the
    rows of the nodes that stopped beating."""
    now = datetime.utcnow()
    async with p.db.tx() as s:
        renewed = await s.execute(
            update(m.ManagementNode).where(m.ManagementNode.uuid == p.node_uuid).values(heartBeat=now)
        )
        if rowcount(renewed) == 0:
            s.add(m.ManagementNode(uuid=p.node_uuid, hostName=host_name(p), joinDate=now, heartBeat=now))
        await s.execute(delete(m.ManagementNode).where(m.ManagementNode.heartBeat < now - HEARTBEAT_DEAD_AFTER))


async def leave(p: Platform) -> None:
    async with p.db.tx() as s:
        await s.execute(delete(m.ManagementNode).where(m.ManagementNode.uuid == p.node_uuid))


async def heartbeat_loop(p: Platform) -> None:
    while True:
        try:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            await beat(p)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("management node heartbeat failed")


@api("IsReadyToGo", public=True)
async def is_ready_to_go(ctx: ApiContext) -> dict[str, Any]:
    """Whether a management node (this one unless ``managementNodeId`` names another) serves the
    API: this one does, since it answers; another, if it beats."""
    node_id = ctx.str("managementNodeId") or ctx.p.node_uuid
    if node_id != ctx.p.node_uuid:
        async with ctx.p.db.tx() as s:
            node = await s.get(m.ManagementNode, node_id)
            if node is None:
                raise not_found("ManagementNode", node_id)
            if node.heartBeat < datetime.utcnow() - HEARTBEAT_DEAD_AFTER:
                raise not_allowed(f"management node[uuid:{node_id}] is not ready: its last heartbeat was at "
                                  f"{query.fmt_date(node.heartBeat)}")
    return {"managementNodeId": node_id}


@api("GetVersion", public=True)
async def get_version(ctx: ApiContext) -> dict[str, Any]:
    return {"version": version("nimbostack")}
