"""The jobs of one Ingress replica: accepting a planned job, cancelling, and the queue that runs
them (job_queue.py).

A job is accepted once its plan is made (the edge checked everything then): its subject is
claimed (the key's `max_subjects`), a place taken among its key's queued jobs (its
`max_queued_jobs`), its plan and record stored and marked queued; then whichever replica has a
free runner starts it, this one first if it can. Any replica answers for any job, since
everything about it is in the store.

An Idempotency-Key is bound to the request it came with (the sha256 of its body): the same key
with the same body gives the same job; with another body it is refused (422), since the client
would otherwise take the first job for the answer to its second request.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from ..artifact_store import ArtifactNotFound
from ..errors import ServiceError, not_found, unavailable, unprocessable
from ..metrics import count_job
from ..settings import JobSettings
from .image_links import ImageLinks
from .job_queue import JobQueue
from .jobs import (
    JobRecord,
    UnknownJob,
    clear_marks,
    end_unplanned,
    idempotency_entry,
    idempotency_key,
    job_prefix,
    job_slots_prefix,
    load_job,
    load_plan,
    new_job_id,
    read_idempotency_entry,
    request_cancel,
    save_new_job,
)
from .leases import runner_lease
from .plans import Plan
from .slots import claim_slot
from .story_flow import StoryFlow


class JobBoard:
    def __init__(self, flow: StoryFlow, links: ImageLinks, replica: str, settings: JobSettings = JobSettings()) -> None:
        self.flow, self.replica, self.max_queued_jobs = flow, replica, settings.max_queued_per_key
        self.store = flow.store
        self.queue = JobQueue(flow, links, replica, settings.runners_per_replica)
        self._accepting: set[asyncio.Future] = set()

    async def submit(self, plan: Plan, *, request_sha256: str, idempotency: Optional[str] = None,
                     max_subjects: Optional[int] = None, max_queued_jobs: Optional[int] = None) -> JobRecord:
        """Accepts the planned job (or answers the job its Idempotency-Key already made) and
        wakes the queue: it starts here if this replica has room, else where there is.

        Shielded from the caller: a client that leaves while its job is being accepted leaves an
        accepted job (its Idempotency-Key finds it again), never half an acceptance (marks of a
        job that does not exist, places held by nothing) from an undo racing the writes' threads."""
        accepting = asyncio.ensure_future(self._accept(plan, request_sha256, idempotency, max_subjects, max_queued_jobs))
        self._accepting.add(accepting)
        accepting.add_done_callback(self._accepting.discard)
        return await asyncio.shield(accepting)

    async def _accept(self, plan: Plan, request_sha256: str, idempotency: Optional[str],
                      max_subjects: Optional[int], max_queued_jobs: Optional[int]) -> JobRecord:
        marker = idempotency_key(plan.owner, idempotency) if idempotency else None
        if marker:
            earlier = await self._earlier(marker, idempotency, request_sha256)
            if earlier is not None:
                return earlier
        job = JobRecord.of_plan(new_job_id(), plan)
        if plan.makes_subject:
            await self.flow.claim(plan, max_subjects)
        marked = False
        try:
            job.job_slot = await self._claim_place(job, max_queued_jobs)
            if marker:
                entry = idempotency_entry(job.job_id, request_sha256)
                marked = await asyncio.to_thread(self.store.create_exclusive, marker, entry, "text/plain")
                if not marked:
                    raise _LostRace()
            await asyncio.to_thread(save_new_job, self.store, job, plan)
        except BaseException as error:
            await self._give_back(plan, job, marker if marked else None)
            if not isinstance(error, _LostRace):
                raise
            earlier = await self._earlier(marker, idempotency, request_sha256, wait=True)
            if earlier is None:
                raise unavailable("a request with this Idempotency-Key is being accepted; retry",
                                  self.flow.retry_after_s) from None
            return earlier  # another request with this key made its job first
        count_job("queued")
        self.queue.wake()
        return job

    async def load(self, job_id: str) -> JobRecord:
        try:
            return await asyncio.to_thread(load_job, self.store, job_id)
        except UnknownJob as error:
            raise not_found(str(error)) from None

    async def cancel(self, job: JobRecord) -> JobRecord:
        """Work queued or running on the model replicas stops; images already made stay. A job
        still waiting in the queue ends at once (here); a running one as soon as its runner sees
        the request (at once if it runs here, within a second elsewhere). Answers the job now."""
        if job.finished:
            return job
        await asyncio.to_thread(request_cancel, self.store, job.job_id)
        runner = self.queue.runners.get(job.job_id)
        if runner is not None:
            runner.cancel_now()
        elif job.status == "queued":
            lease = runner_lease(self.store, job.job_id, self.replica)
            if await asyncio.to_thread(lease.acquire):
                # Nobody runs it: a runner here sees the cancel request first thing and ends it,
                # giving back its subject and its places.
                try:
                    fresh = await self.load(job.job_id)
                    if fresh.finished:  # it ended meanwhile (its runner was elsewhere)
                        await asyncio.to_thread(lease.release)
                        return fresh
                    plan = await asyncio.to_thread(load_plan, self.store, job.job_id)
                except ArtifactNotFound:  # accepted by a version that stored no plan
                    await asyncio.to_thread(end_unplanned, self.store, fresh, cancelled=True)
                    await asyncio.to_thread(lease.release)
                    return await self.load(job.job_id)
                except BaseException:
                    await asyncio.to_thread(lease.release)
                    raise
                # Shielded: a client that leaves mid-DELETE does not stop the runner halfway.
                await asyncio.shield(self.queue.start(fresh, plan, lease).task)
        return await self.load(job.job_id)

    async def sweep_forever(self) -> None:
        """Runs this replica's part of the queue (job_queue.py) until the replica stops."""
        await self.queue.work_forever()

    async def _claim_place(self, job: JobRecord, limit: Optional[int]) -> int:
        limit = self.max_queued_jobs if limit is None else limit
        place = await asyncio.to_thread(claim_slot, self.store, job_slots_prefix(job.owner), limit, job.job_id)
        if place is None:
            who = f"API key {job.owner!r}" if job.owner else "this service"
            raise ServiceError(
                429, f"{who} has {limit} jobs queued or running, its limit; wait for one to finish "
                "(GET /v1/jobs/{id} or its events) or cancel one (DELETE /v1/jobs/{id}), then send this again",
                self.flow.retry_after_s,
            )
        return place

    async def _give_back(self, plan: Plan, job: JobRecord, marker: Optional[str]) -> None:
        """Undoes a submission that failed part-way, its store writes included, so that the
        same request can be sent again."""
        if marker is not None:
            await asyncio.to_thread(self.store.delete_prefix, marker)
        await asyncio.to_thread(clear_marks, self.store, job)
        await asyncio.to_thread(self.store.delete_prefix, job_prefix(job.job_id))
        if plan.makes_subject:
            await self.flow.release(plan)

    async def _earlier(self, marker: str, given: str, request_sha256: str, wait: bool = False) -> Optional[JobRecord]:
        """The job this Idempotency-Key already made, if it made one; 422 if it came with
        another request. `wait`: the key's winner may be a moment from storing its job."""
        for _ in range(100 if wait else 1):
            try:
                job_id, sha = read_idempotency_entry(await asyncio.to_thread(self.store.get, marker))
                break
            except KeyError:  # ArtifactNotFound: the marker is not there (yet)
                if not wait:
                    return None
                await asyncio.sleep(0.1)
        else:
            return None
        if sha is not None and sha != request_sha256:
            raise unprocessable(
                f"Idempotency-Key {given[:80]!r} was already used with a different request (job {job_id}); "
                "send a new key for a new request, or the same body to get that job"
            )
        for _ in range(100):
            try:
                return await asyncio.to_thread(load_job, self.store, job_id)
            except UnknownJob:
                await asyncio.sleep(0.1)  # the record is a moment from stored
        return await self.load(job_id)


class _LostRace(Exception):
    """Another request with the same Idempotency-Key made its job first."""
