"""Jobs: asynchronous APIs answer Processing with a job uuid; the result is kept in the database
so any management node can answer ``GET /zstack/api/result/<job>``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from sqlalchemy import bindparam, insert, select, update

from nimbostack.core.errors import MANAGEMENT_RESTARTED, ApiError
from nimbostack.db.engine import NO_SYNC, Database, StorageFull
from nimbostack.db.models import Job

log = logging.getLogger(__name__)

# every asynchronous API call runs these two (db/engine.py, "Statements built once"); a statement,
# not an ORM object, so that the transaction has no unit of work to flush
_NEW_JOB = insert(Job)
_JOB_DONE = update(Job).where(Job.uuid == bindparam("job")).values(state="Done", result=bindparam("result"))
# how often a result the database refused for want of space is offered to it again
SAVE_RETRY = 1.0


class Jobs:
    def __init__(self, db: Database, max_running: int = 64) -> None:
        self.db = db
        self._running: dict[str, asyncio.Task[str]] = {}
        self._progress: dict[str, str] = {}
        # At most this many jobs work at once; the others wait their turn in arrival order (the
        # semaphore is FIFO). Without a cap every accepted job ran at once: the event loop's lag
        # grew with them (host pings timed out, hosts went Disconnected) and the jobs finished in
        # no particular order, so some waited many times longer than the rest.
        self._slots = asyncio.Semaphore(max_running)
        # results the database could not store yet (its disk full), answered from here meanwhile
        self._unsaved: dict[str, str] = {}
        self._saving: set[asyncio.Task[None]] = set()

    async def start(
        self,
        job_uuid: str,
        api_name: str,
        timeout: float,
        work: Callable[[], Awaitable[str]],
        resource_uuid: str | None = None,
    ) -> asyncio.Task[str]:
        async with self.db.tx() as s:
            await s.execute(
                _NEW_JOB,
                {
                    "uuid": job_uuid,
                    "apiName": api_name,
                    "state": "Processing",
                    "deadline": datetime.utcnow() + timedelta(seconds=timeout),
                    "resourceUuid": resource_uuid,
                },
            )
        task = asyncio.create_task(self._run(job_uuid, work))
        self._running[job_uuid] = task
        return task

    async def _run(self, job_uuid: str, work: Callable[[], Awaitable[str]]) -> str:
        try:
            async with self._slots:
                result = await work()
            try:
                await self._save(job_uuid, result)
            except StorageFull:
                # The work is over and its answer known; only its record waits for space. Without
                # it a poll that came after this task ended read "Processing" for ever.
                self._unsaved[job_uuid] = result
                saving = asyncio.create_task(self._save_later(job_uuid, result))
                self._saving.add(saving)
                saving.add_done_callback(self._saving.discard)
            return result
        finally:
            self._running.pop(job_uuid, None)
            self._progress.pop(job_uuid, None)

    async def _save(self, job_uuid: str, result: str) -> None:
        async with self.db.tx() as s:
            await s.execute(_JOB_DONE, {"job": job_uuid, "result": result}, execution_options=NO_SYNC)

    async def _save_later(self, job_uuid: str, result: str) -> None:
        while True:
            await asyncio.sleep(SAVE_RETRY)
            try:
                await self._save(job_uuid, result)
            except StorageFull:
                continue
            self._unsaved.pop(job_uuid, None)
            return

    async def set_progress(self, job_uuid: str, progress: str) -> None:
        """What a long job reports while it runs (e.g. "42%"); any node answers it from the database."""
        self._progress[job_uuid] = progress
        async with self.db.tx() as s:
            await s.execute(update(Job).where(Job.uuid == job_uuid).values(progress=progress))

    async def result(self, job_uuid: str, wait: float = 0) -> tuple[str, str | None, str | None] | None:
        """(state, result JSON, progress) or None if unknown. A job running on this node is waited
        for up to ``wait`` seconds, so a polling client needs fewer requests; the answer then comes
        from memory, without a database read."""
        task = self._running.get(job_uuid)
        if task is not None:
            if not task.done() and wait > 0:
                await asyncio.wait({task}, timeout=wait)
            if not task.done():
                return "Processing", None, self._progress.get(job_uuid)
            if not task.cancelled() and task.exception() is None:
                return "Done", task.result(), None
        unsaved = self._unsaved.get(job_uuid)
        if unsaved is not None:
            return "Done", unsaved, None
        async with self.db.tx() as s:
            job = await s.get(Job, job_uuid)
        if job is None:
            return None
        return job.state, job.result, job.progress

    def in_flight(self) -> int:
        return len(self._running)

    async def orphans(self) -> list[tuple[str, str, str | None]]:
        """(job uuid, API name, resource uuid) of the jobs a previous run left Processing."""
        async with self.db.tx() as s:
            rows = await s.execute(select(Job.uuid, Job.apiName, Job.resourceUuid).where(Job.state == "Processing"))
            return [(r.uuid, r.apiName, r.resourceUuid) for r in rows]

    async def fail_orphans(
        self, reply_for: Callable[[str, ApiError], str], outcomes: dict[str, str] | None = None
    ) -> int:
        """At start-up, no job of a previous run can still be running: answer each with what
        ``outcomes`` says became of it (job uuid -> result), the others with an error."""
        outcomes = outcomes or {}
        async with self.db.tx() as s:
            jobs = (await s.execute(select(Job).where(Job.state == "Processing"))).scalars().all()
            for job in jobs:
                if job.uuid in outcomes:
                    job.state, job.result = "Done", outcomes[job.uuid]
                    continue
                err = ApiError(
                    MANAGEMENT_RESTARTED,
                    "The management node restarted while the API ran",
                    "the operation was rolled back or settled by recovery; check the resource",
                )
                job.state = "Done"
                job.result = reply_for(job.apiName, err)
        if jobs:
            log.warning("answered %d jobs orphaned by a restart", len(jobs))
        return len(jobs)


def dumps(obj: object) -> str:
    return json.dumps(obj, default=str, separators=(",", ":"))
