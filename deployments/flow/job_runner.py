"""Runs one job on an Ingress replica: its plan through the story flow, with the flow's progress
written to the job's record and event log (steps at most once a second, images at once), a lease
renewed while it runs, and the job's cancel marker watched. Its calls are patient: model
replicas at capacity are waited for, so a job accepted is never failed for capacity. When it
ends, it gives up what it held (its place in the queue, its key's job slot, its active mark).

A job taken over after its replica died runs its plan again from what the store holds: images
already stored are not made again (same subject, seeds and request id: the same images), and
anchors whose images are all stored are not made again either.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional, Sequence

from consistory.progress import StepProgress

from ..errors import ServiceError
from ..metrics import count_job
from .image_links import ImageLinks
from .jobs import JobRecord, RunningImage, append_event, cancel_requested, clear_marks, queue_key, save_job
from .leases import Lease
from .plans import MadeImage, Plan
from .story_flow import StoryFlow

logger = logging.getLogger("ray.serve")
RENEW_S = 5.0  # renewing the lease this often (it lapses after leases.RUNNER_LEASE_S)
# Looking for a cancel request (DELETE may reach any replica) this often: one made while the
# anchors are being made must stop them, not arrive once they are stored.
CANCEL_POLL_S = 1.0
PROGRESS_EVERY_S = 1.0  # progress reaches the store at most this often (images: at once)


class JobRunner:
    """The job's progress sink too (story_flow.ProgressSink)."""

    def __init__(self, flow: StoryFlow, links: ImageLinks, job: JobRecord, plan: Plan, lease: Lease) -> None:
        self.flow, self.links, self.job, self.plan, self.lease = flow, links, job, plan, lease
        self.store = flow.store
        self._writes = asyncio.Lock()  # record and events reach the store in order
        self._last_progress = 0.0
        self._cancelled = False  # by the job's owner, as opposed to this replica going away
        self._lost = False  # its lease was taken over by another replica
        self._work: Optional[asyncio.Future] = None
        self.task: Optional[asyncio.Future] = None  # run(), once started

    # --- what the flow reports ---
    async def step(self, indices: Sequence[int], progress: StepProgress) -> None:
        running = {r.index: r for r in self.job.running}
        for index in indices:
            running[index] = RunningImage(index=index, progress=progress)
        self.job.running = sorted(running.values(), key=lambda r: r.index)
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            await self._persist(("progress", self.job.progress()))

    async def stored(self, image: MadeImage) -> None:
        job = self.job
        # The record keeps where the image is, not its bytes.
        job.images = [i for i in job.images if i.index != image.index] + [image.model_copy(update={"png": None})]
        job.images_done = len(job.images)
        job.running = [r for r in job.running if r.index != image.index]
        await self._persist(("image", await self.links.public(image, "url")))

    # --- running ---
    async def run(self) -> None:
        job = self.job
        await asyncio.to_thread(self.store.delete_prefix, queue_key(job))  # it waits no more
        self._work = asyncio.ensure_future(self._make())
        keeper = asyncio.ensure_future(self._keep_lease(self._work))
        try:
            await self._work
            job.status = "succeeded"
            job.result = {"subject_id": job.subject_id, "images_total": job.images_total}
            await self._persist(("status", {"status": "succeeded"}))
        except asyncio.CancelledError:
            if self._lost:
                logger.warning("job %s: another replica took it over; this runner stops", job.job_id)
                return
            if not self._cancelled:
                raise  # this replica is stopping: the lease expires and another replica takes over
            await self._end_cancelled()
        except ServiceError as error:
            await self._fail(error.status_code, error.detail)
        except Exception:
            logger.exception("job %s failed", job.job_id)
            await self._fail(500, f"internal error; report job id {job.job_id}")
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        await asyncio.to_thread(clear_marks, self.store, job)
        await asyncio.to_thread(self.lease.release)

    async def _make(self) -> None:
        job = self.job
        if await asyncio.to_thread(cancel_requested, self.store, job.job_id):
            self._cancelled = True  # cancelled while it waited in the queue
            raise asyncio.CancelledError
        job.status, job.queue_position = "running", None
        await self._persist(("status", {"status": "running"}))
        done = {image.index for image in job.images}
        # Patient: model replicas at capacity are waited for; an accepted job never fails for it.
        await self.flow.run(self.plan, sink=self, done=done, patient=True)

    def cancel_now(self) -> None:
        """A cancel asked of this replica itself: no need to wait for the next look at the store."""
        self._cancelled = True
        if self._work is not None:
            self._work.cancel()

    async def _end_cancelled(self) -> None:
        job = self.job
        if self.plan.makes_subject and not job.images:
            # Nothing was delivered: a cancelled story leaves no subject, even one whose
            # anchors a model replica is still storing (flow/subjects.py, forgotten_key).
            await self.flow.release(self.plan)
        job.status, job.running = "cancelled", []
        await self._persist(("status", {"status": "cancelled"}))

    async def _fail(self, status: int, detail: str) -> None:
        job = self.job
        if self.plan.makes_subject and not job.images:
            # Nothing was delivered: leave no subject behind, as the synchronous routes do.
            await self.flow.release(self.plan)
        job.status, job.running = "failed", []
        job.error = {"status": status, "detail": detail}
        await self._persist(("status", {"status": "failed", "error": job.error}))

    async def _keep_lease(self, work: asyncio.Future) -> None:
        renewed = time.monotonic()
        while not work.done():
            await asyncio.sleep(CANCEL_POLL_S)
            try:
                if time.monotonic() - renewed >= RENEW_S:
                    if not await asyncio.to_thread(self.lease.renew):
                        # This replica stalled past the lease's expiry and another took the job
                        # over: two runners would write one job's events. Stop, writing nothing.
                        self._lost = True
                        work.cancel()
                        return
                    renewed = time.monotonic()
                if await asyncio.to_thread(cancel_requested, self.store, self.job.job_id):
                    self._cancelled = True
                    work.cancel()  # the streams close; the model replicas stop at their next step
            except Exception:
                logger.exception("job %s: could not renew its lease", self.job.job_id)

    async def _persist(self, event: Optional[tuple[str, dict[str, Any]]] = None) -> None:
        if event is not None and event[0] == "status":
            count_job(event[1]["status"])
        async with self._writes:
            snapshot = self.job.model_copy(deep=True)
            if event is not None:
                await asyncio.to_thread(append_event, self.store, snapshot, *event)
                self.job.events = snapshot.events
            await asyncio.to_thread(save_job, self.store, snapshot)
