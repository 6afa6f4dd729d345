"""The node's in-process event bus: what changed, pushed to the web UI's open pages (api/web.py's
server-sent events) so that a VM's state appears there without a reload, whoever changed it — an
API call, or the hypervisor itself (an agent's event, compute/vmsync.py).

``publish`` is one call on the hot paths that know of a change: it builds a small dict and puts it
into each subscriber's bounded queue, never awaits and never touches the database. Whether a
subscriber may see an event (its account owns the resource) is decided on the subscriber's side,
where only the few events it is sent cost a look-up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# events a slow subscriber may fall behind by; past that it is told to reload ("overflow")
QUEUE_LIMIT = 1000


class EventBus:
    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[dict[str, Any]]] = set()
        self.published = 0

    def publish(self, resource_type: str, uuid: str, **fields: Any) -> None:
        """``resource_type``: the inventory's VO name (``VmInstanceVO``); ``fields``: what is known
        of the change (``state``, ``api``, ``account`` — the account whose call made it)."""
        if not self._queues:
            return
        event = {"resourceType": resource_type, "uuid": uuid, "at": time.time(), **fields}
        self.published += 1
        for queue in self._queues:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                # the subscriber reloads what it shows instead of replaying what it missed
                queue.get_nowait()
                queue.put_nowait({"resourceType": "", "uuid": "", "at": event["at"], "overflow": True})

    @contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_LIMIT)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._queues)


def subject(params: dict[str, Any], resource_uuid: str | None) -> str:
    """The uuid an API call is about: the one it creates, else the one it names first."""
    if resource_uuid:
        return resource_uuid
    for name in ("uuid", "vmInstanceUuid", "volumeUuid", "hostUuid", "l3NetworkUuid", "imageUuid"):
        value = params.get(name)
        if isinstance(value, str) and value:
            return value
    return ""


def announce_job(bus: EventBus, api: str, uuid: str, account: str, task: asyncio.Future[Any]) -> None:
    """An API job that changes something: published when it starts and again when it ends, so that
    an open page shows the transitional state (Starting) and then the outcome."""
    bus.publish("api", uuid, api=api, account=account, phase="started")
    task.add_done_callback(lambda _t: bus.publish("api", uuid, api=api, account=account, phase="done"))
