"""The job queue as one Ingress replica works it: at most `runners_per_replica` jobs run here at
once; the others wait in the store's queue (`queue/`, oldest first) for whichever replica has
room, so accepted jobs never all press on the model replicas' own bounded queues at once.

Every few seconds, and whenever a job is accepted or one of its runners ends, the replica:
  1. takes over started jobs whose runner stopped renewing its lease (its replica died);
  2. starts queued jobs, oldest first, while it has room (a job's runner lease decides who runs
     it, so two replicas never run one job);
  3. tells the first queued jobs their new place in the queue, as a status event, under the
     same lease (the one writer of a job's events at any time);
  4. every few minutes, frees job slots that no unfinished job holds (their replica died between
     claiming one and storing the job).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from ..artifact_store import ArtifactNotFound, ArtifactStoreError
from .image_links import ImageLinks
from .job_runner import JobRunner
from .jobs import (
    JOB_SLOTS,
    UNREADABLE_PLAN,
    JobRecord,
    UnknownJob,
    active_job_ids,
    append_event,
    clear_marks,
    end_unplanned,
    load_job,
    load_plan,
    queued_job_ids,
    save_job,
)
from .leases import Lease, runner_lease
from .plans import Plan
from .slots import held_slots
from .story_flow import StoryFlow

logger = logging.getLogger("ray.serve")
SWEEP_S = 5.0  # how often each replica looks at the queue without being woken
TOLD_AHEAD = 20  # queued jobs told each change of their place (those further back: when they near)
HOUSEKEEPING_S = 300.0
ORPHAN_SLOT_S = 600.0  # a job slot no unfinished job holds is freed after this long


class JobQueue:
    def __init__(self, flow: StoryFlow, links: ImageLinks, replica: str, runners: int) -> None:
        self.flow, self.links, self.replica, self.room = flow, links, replica, runners
        self.store = flow.store
        self.runners: dict[str, JobRunner] = {}
        self._woken = asyncio.Event()
        self._passing = asyncio.Lock()  # one pass at a time: room is counted once
        self._told: dict[str, int] = {}  # queue places this replica knows were told
        self._housekept = 0.0

    def wake(self) -> None:
        self._woken.set()

    def start(self, job: JobRecord, plan, lease: Lease) -> JobRunner:
        runner = JobRunner(self.flow, self.links, job, plan, lease)
        self.runners[job.job_id] = runner
        runner.task = asyncio.ensure_future(runner.run())

        def ended(_: asyncio.Future) -> None:
            self.runners.pop(job.job_id, None)
            self.wake()  # its room goes to the next queued job at once

        runner.task.add_done_callback(ended)
        return runner

    async def work_forever(self) -> None:
        while True:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 a wait_for cancelled as its
                # timeout fires can swallow the cancellation, and the replica never stops this.
                async with asyncio.timeout(SWEEP_S):
                    await self._woken.wait()
            except TimeoutError:
                pass
            self._woken.clear()
            try:
                await self.work_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("job queue pass failed; retrying")

    async def work_once(self) -> None:
        async with self._passing:
            queued = await asyncio.to_thread(queued_job_ids, self.store)
            waiting = set(queued)
            for job_id in await asyncio.to_thread(active_job_ids, self.store):
                if job_id not in waiting and job_id not in self.runners and self._has_room():
                    await self._take(job_id, taking_over=True)
            for job_id in queued:
                if not self._has_room():
                    break
                if job_id not in self.runners:
                    await self._take(job_id, taking_over=False)
            left = [j for j in queued if j not in self.runners]
            await self._tell_places(left[:TOLD_AHEAD])
            self._told = {j: p for j, p in self._told.items() if j in waiting}
            if time.monotonic() - self._housekept > HOUSEKEEPING_S:
                self._housekept = time.monotonic()
                await asyncio.to_thread(self._free_orphan_slots)

    def _has_room(self) -> bool:
        return len(self.runners) < self.room

    async def _take(self, job_id: str, taking_over: bool) -> None:
        lease = runner_lease(self.store, job_id, self.replica)
        if not await asyncio.to_thread(lease.acquire):
            return  # running elsewhere, or being told its place
        try:
            runnable = await self._runnable(job_id)
        except BaseException:
            await asyncio.to_thread(lease.release)
            raise
        if runnable is None:
            await asyncio.to_thread(lease.release)
            return
        if taking_over:
            logger.info("taking over job %s (its runner stopped)", job_id)
        self.start(*runnable, lease)

    async def _runnable(self, job_id: str) -> Optional[tuple[JobRecord, Plan]]:
        """The job and its plan, with this replica holding its lease; None when there is nothing
        to run (ending the job here if it can never run)."""
        try:
            job = await asyncio.to_thread(load_job, self.store, job_id)
        except (UnknownJob, ArtifactNotFound):
            return None  # accepted a moment ago (marked before its record is stored), or deleted
        except Exception:
            # The store failing, or a record this version cannot read: the jobs behind this one
            # still run, and this one is looked at again on the next pass.
            logger.exception("job %s: its record could not be read; passing it over", job_id)
            return None
        if job.finished:  # its runner ended it but died before clearing its marks
            await asyncio.to_thread(clear_marks, self.store, job)
            return None
        try:
            return job, await asyncio.to_thread(load_plan, self.store, job_id)
        except ArtifactNotFound:
            # The plan is stored before the record, so a record without one was accepted by a
            # version of the service that kept no plan: nothing here can run it again.
            logger.warning("job %s has no stored plan (accepted by an earlier version); failing it", job_id)
            await asyncio.to_thread(end_unplanned, self.store, job)
        except ArtifactStoreError:
            logger.exception("job %s: the store failed reading its plan; trying again later", job_id)
        except Exception:
            # A plan that cannot be read (its uploads gone, or written by another version) will
            # not become readable: the job ends, saying so, instead of coming back every pass.
            logger.exception("job %s: its stored plan cannot be read; failing it", job_id)
            await asyncio.to_thread(end_unplanned, self.store, job, UNREADABLE_PLAN)
        return None

    async def _tell_places(self, job_ids: list[str]) -> None:
        for place, job_id in enumerate(job_ids):
            if self._told.get(job_id) == place:
                continue
            lease = runner_lease(self.store, job_id, self.replica)
            if not await asyncio.to_thread(lease.acquire):
                continue
            try:
                await asyncio.to_thread(_tell_place, self.store, job_id, place)
                self._told[job_id] = place
            except (UnknownJob, ArtifactNotFound):
                pass
            except Exception:  # an unreadable record, or the store failing: the others are told
                logger.exception("job %s: could not tell it its place in the queue", job_id)
            finally:
                await asyncio.to_thread(lease.release)

    def _free_orphan_slots(self) -> None:
        active = set(active_job_ids(self.store))
        for slot in held_slots(self.store, JOB_SLOTS, taken_before=time.time() - ORPHAN_SLOT_S):
            if slot.holder not in active:
                self.store.delete_prefix(slot.key)


def _tell_place(store, job_id: str, place: int) -> None:
    job = load_job(store, job_id)
    if job.status == "queued" and job.queue_position != place:
        job.queue_position = place
        append_event(store, job, "status", {"status": "queued", "queue_position": place})
        save_job(store, job)
