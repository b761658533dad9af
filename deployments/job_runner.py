"""Runs a job on an Ingress replica: the same anchor batch and fan-out as the synchronous
routes, with each image's denoising steps streamed back from the model replicas and written to
the job's record and event log (throttled), a lease renewed while it runs, and the job's cancel
marker watched.

A job taken over after its replica died starts again from what the store holds: a story whose
subject record exists skips its anchors, and images already stored are not made again (same
subject, seeds and request id: the same images).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Optional

from fastapi import HTTPException

from .jobs import (
    JobRecord,
    RunningImage,
    append_event,
    cancel_requested,
    runner_lease_key,
    save_job,
)
from .messages import AnchorsResult, ImageResult
from .metrics import count_images, count_job, observe_time_to_consistent_subject
from .remote import call
from .subjects import acquire_lease, image_key, record_key, release_subject

if TYPE_CHECKING:
    from .ingress import Ingress

logger = logging.getLogger("ray.serve")
LEASE_S = 30.0  # a runner that stops renewing for this long is presumed dead
RENEW_S = 5.0  # renewing, and looking for a cancel request, this often
PROGRESS_EVERY_S = 1.0  # progress reaches the store at most this often (images: at once)


def active_key(job_id: str) -> str:
    return f"active-jobs/{job_id}"


def take_lease(store, job_id: str, replica: str) -> bool:
    return acquire_lease(store, runner_lease_key(job_id), replica, LEASE_S)


class JobRunner:
    def __init__(self, ingress: "Ingress", job: JobRecord, replica: str) -> None:
        self.ingress, self.job, self.replica = ingress, job, replica
        self.store = ingress.store
        self._writes = asyncio.Lock()  # record and events reach the store in order
        self._last_progress = 0.0
        self._started = time.perf_counter()
        self._cancelled = False  # by the job's owner, as opposed to this replica going away

    # --- persistence ---
    async def _persist(self, event: Optional[tuple[str, dict[str, Any]]] = None) -> None:
        if event is not None and event[0] == "status":
            count_job(event[1]["status"])
        async with self._writes:
            snapshot = self.job.model_copy(deep=True)
            if event is not None:
                await asyncio.to_thread(append_event, self.store, snapshot, *event)
                self.job.events = snapshot.events
            await asyncio.to_thread(save_job, self.store, snapshot)

    def _progress_event(self) -> dict[str, Any]:
        return {"images_done": self.job.images_done, "images_total": self.job.images_total,
                "running": [r.model_dump() for r in self.job.running]}

    async def _on_step(self, indices: list[int], event: dict[str, Any]) -> None:
        running = {r.index: r for r in self.job.running}
        for index in indices:
            running[index] = RunningImage(index=index, pass_index=event["pass"], step=event["step"],
                                          steps=event["steps"])
        self.job.running = sorted(running.values(), key=lambda r: r.index)
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            await self._persist(("progress", self._progress_event()))

    async def _image_stored(self, entry: dict[str, Any]) -> None:
        self.job.images = [i for i in self.job.images if i["index"] != entry["index"]] + [entry]
        self.job.images_done = len(self.job.images)
        self.job.running = [r for r in self.job.running if r.index != entry["index"]]
        await self._persist(("image", await self.ingress.public_image(entry, "url")))

    # --- running ---
    async def run(self) -> None:
        job = self.job
        job.status = "running"
        await self._persist(("status", {"status": "running"}))
        work = self._work_task = asyncio.ensure_future(self._work())
        keeper = asyncio.ensure_future(self._keep_lease(work))
        try:
            await work
            job.status = "succeeded"
            job.result = {"subject_id": job.subject_id, "images_total": job.images_total}
            await self._persist(("status", {"status": "succeeded"}))
        except asyncio.CancelledError:
            if not self._cancelled:
                raise  # this replica is stopping: the lease expires and another replica takes over
            job.status = "cancelled"
            job.running = []
            await self._persist(("status", {"status": "cancelled"}))
        except HTTPException as error:
            await self._fail(error.status_code, str(error.detail))
        except Exception:
            logger.exception("job %s failed", job.job_id)
            await self._fail(500, f"internal error; report job id {job.job_id}")
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        await asyncio.to_thread(self.store.delete_prefix, active_key(job.job_id))
        await asyncio.to_thread(self.store.delete_prefix, runner_lease_key(job.job_id))

    def cancel_now(self) -> None:
        """A cancel asked of this replica itself: no need to wait for the next lease renewal."""
        self._cancelled = True
        if getattr(self, "_work_task", None) is not None:
            self._work_task.cancel()

    async def _fail(self, status: int, detail: str) -> None:
        job = self.job
        if job.kind in ("story", "subject") and job.subject_id and not job.images:
            # Nothing was delivered: leave no subject behind, as the synchronous routes do.
            await asyncio.to_thread(release_subject, self.store, job.owner, job.subject_id)
        job.status, job.running = "failed", []
        job.error = {"status": status, "detail": detail}
        await self._persist(("status", {"status": "failed", "error": job.error}))

    async def _keep_lease(self, work: asyncio.Future) -> None:
        key = runner_lease_key(self.job.job_id)
        while not work.done():
            await asyncio.sleep(RENEW_S)
            body = json.dumps({"owner": self.replica, "expires_at": time.time() + LEASE_S}).encode()
            try:
                await asyncio.to_thread(self.store.put, key, body, "application/json")
                if await asyncio.to_thread(cancel_requested, self.store, self.job.job_id):
                    self._cancelled = True
                    work.cancel()  # the streams close; the model replicas stop at their next step
            except Exception:
                logger.exception("job %s: could not renew its lease", self.job.job_id)

    async def _work(self) -> None:
        job, ingress = self.job, self.ingress
        body = job.request
        done = {i["index"] for i in job.images}
        uploads = await asyncio.to_thread(ingress.job_uploads, job)
        if job.kind == "images":
            record = await ingress.owned_record(job.subject_id, job.owner)
            seeds = body.get("seeds") or record.default_seeds(len(body["prompts"]))
            await asyncio.gather(*[
                self._new_image(j, prompt, seeds[j], uploads.image_kwargs(j)) for j, prompt in enumerate(body["prompts"]) if j not in done])
            return
        prompts, n_anchors, seed, config = ingress.job_plan(job)
        if not await asyncio.to_thread(self.store.exists, record_key(job.subject_id)):
            anchors = await self._anchors(prompts[:n_anchors], body["subjects"], seed, config,
                                          uploads.anchor_kwargs(n_anchors))
            for i, png in enumerate(anchors.pngs):
                entry = await ingress.store_job_image(job, i, prompts[i], anchors.seeds[i], png)
                await self._image_stored(entry)
            count_images("anchor", len(anchors.pngs))
            if job.kind == "subject":
                observe_time_to_consistent_subject(time.perf_counter() - self._started)
        if job.kind == "story":
            await asyncio.gather(*[self._new_image(i, prompts[i], seed + i, uploads.image_kwargs(i))
                                   for i in range(n_anchors, len(prompts)) if i not in done])

    async def _anchors(self, prompts, subjects, seed, config, uploads: dict) -> AnchorsResult:
        job, ingress = self.job, self.ingress
        indices = list(range(len(prompts)))

        async def streamed() -> AnchorsResult:
            stream = ingress.anchor_stage.options(stream=True).create_stream.remote(
                job.subject_id, prompts, subjects, seed, config.to_dict(), job.owner, **uploads)
            async for item in stream:
                if isinstance(item, dict):
                    await self._on_step(indices, item)
                else:
                    return item
            raise RuntimeError("the anchor stage ended its stream without a result")

        result = await call(streamed, "anchor stage", ingress.settings.retry_after_s)
        ingress.refs.put(job.subject_id, result.cache)
        return result

    async def _new_image(self, index: int, prompt: str, seed: int, control: dict) -> None:
        job, ingress = self.job, self.ingress
        cache = ingress.refs.get(job.subject_id)
        handle = ingress.generator.options(multiplexed_model_id=job.subject_id, stream=True)

        async def streamed() -> ImageResult:
            async for item in handle.generate_stream.remote(cache, prompt, seed, **control):
                if isinstance(item, dict):
                    await self._on_step([index], item)
                else:
                    return item
            raise RuntimeError("the generator ended its stream without a result")

        result = await call(streamed, "generator", ingress.settings.retry_after_s)
        count_images("new")
        if job.kind == "story" and job.images_done == ingress.job_plan(job)[1]:
            observe_time_to_consistent_subject(time.perf_counter() - self._started)
        entry = await ingress.store_job_image(job, index, prompt, result.seed, result.png)
        await self._image_stored(entry)


def image_entry(job: JobRecord, index: int, prompt: str, seed: int) -> dict[str, Any]:
    return {"index": index, "prompt": prompt, "seed": seed, "key": image_key(job.subject_id, job.request_id, index)}


