"""The story flow: the one way a planned request is made, for the synchronous routes and for jobs.

    plan -> anchors (AnchorStage) -> the other prompts fanned out (Generators) -> store

Anchors first, if the plan makes a subject: the AnchorStage persists the anchor cache and the
subject record and hands the cache on as a `CacheHandle`. Then every other prompt is one
Generator call, all at once, reached through Serve's model multiplexing keyed by the subject id
so that they go where its cache already is; the handle is offered with each call, and the
cache's bytes go from the AnchorStage to the Generators through Ray's object store, never
through here. Every image is stored before it is reported, and the answer lists them in prompt
order. A caller that wants each step as it happens passes a `ProgressSink`; its calls are then
streamed, and stopping the flow stops the model replicas at their next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Collection, Optional, Protocol, Sequence

from consistory.progress import StepProgress

from ..artifact_store import ArtifactStore
from ..errors import ServiceError, not_found
from ..messages import DEFAULT_CONTROL_SCALE, AnchorRequest, AnchorsResult, ImageRequest, ImageResult
from ..metrics import count_images, observe_stage, observe_time_to_consistent_subject
from .cache_refs import CacheRefs
from .plans import MadeImage, Plan
from .remote import call, gather_in_order
from .subjects import (
    OverQuota,
    UnknownSubject,
    claim_subject,
    delete_subject,
    image_key,
    images_prefix,
    record_key,
    release_subject,
)

logger = logging.getLogger("ray.serve")


class ProgressSink(Protocol):
    """Who hears of a flow's progress as it happens (a job's event log)."""

    async def step(self, indices: Sequence[int], progress: StepProgress) -> None:
        """A denoising step finished for the images of these prompt indices."""

    async def stored(self, image: MadeImage) -> None:
        """An image is in the store."""


@dataclass
class Outcome:
    subject_id: str
    images: list[MadeImage]  # those made by this run, in prompt order
    timings: dict[str, float]


class StoryFlow:
    def __init__(self, anchor_stage: Any, generator: Any, store: ArtifactStore, refs: CacheRefs,
                 retry_after_s: float) -> None:
        self.anchor_stage, self.generator = anchor_stage, generator  # Serve DeploymentHandles
        self.store, self.refs, self.retry_after_s = store, refs, retry_after_s
        self._undoing: set[asyncio.Future] = set()  # releases that outlive their cancelled callers

    async def answer(self, plan: Plan, max_subjects: Optional[int] = None,
                     started: Optional[float] = None) -> Outcome:
        """A plan run while its client waits. A subject it makes is claimed for its owner first
        and forgotten again if anything fails or the client goes: its id never reached anyone."""
        if not plan.makes_subject:
            return await self.run(plan, started=started)
        await self.claim(plan, max_subjects)
        try:
            return await self.run(plan, started=started)
        except BaseException:
            await self.release(plan)
            raise

    async def claim(self, plan: Plan, max_subjects: Optional[int]) -> None:
        """Counts the plan's new subject against its owner's `max_subjects` (429 when over)."""
        claiming = asyncio.ensure_future(
            asyncio.to_thread(claim_subject, self.store, plan.owner, plan.subject_id, max_subjects))
        try:
            await asyncio.shield(claiming)
        except OverQuota as error:
            raise ServiceError(429, str(error)) from None  # no Retry-After: only a deletion makes room
        except asyncio.CancelledError:
            # The caller went while the claim was being written; its thread goes on and writes
            # it. Undo it once written, or the owner's place stays held by a subject nobody has.
            self._release_later(claiming, plan)
            raise

    async def release(self, plan: Plan) -> None:
        """Undoes `claim` and whatever was stored for the subject; runs to its end even when the
        caller is being cancelled."""
        self.refs.drop(plan.subject_id)
        try:
            await asyncio.shield(asyncio.to_thread(release_subject, self.store, plan.owner, plan.subject_id))
        except Exception:  # the original failure is what the caller must see
            logger.exception("could not remove subject %s after a failed request", plan.subject_id)

    async def forget(self, subject_id: str) -> None:
        """Deletes a subject: its record, cache and images. Generators drop their copies as their
        LRUs turn over; nothing can reach them by this id any more."""
        try:
            await asyncio.to_thread(delete_subject, self.store, subject_id)
        except UnknownSubject as error:
            raise not_found(str(error)) from None
        self.refs.drop(subject_id)

    async def run(self, plan: Plan, sink: Optional[ProgressSink] = None, done: Collection[int] = (),
                  started: Optional[float] = None, patient: bool = False) -> Outcome:
        """Makes and stores every image of the plan not in `done` (the prompt indices already
        stored by an earlier run of it, whose anchors are then not made again). `patient` (a
        job): model replicas at capacity are waited for, not answered with 503."""
        started = time.perf_counter() if started is None else started
        anchors: Optional[AnchorsResult] = None
        steps: list[Awaitable[MadeImage]] = []
        if plan.n_anchors and not set(range(plan.n_anchors)) <= set(done):
            anchors = await self._anchors(plan, sink, patient)
            steps += [self._store(plan, i, anchors.seeds[i], png, sink) for i, png in enumerate(anchors.pngs)]
        anchors_done = time.perf_counter()
        first_new: list[float] = []

        async def new_image(index: int) -> MadeImage:
            image = await self._new_image(plan, index, sink, patient)
            first_new.append(time.perf_counter())
            return image

        steps += [new_image(i) for i in range(plan.n_anchors, len(plan.prompts)) if i not in done]
        images = await gather_in_order(steps)
        if not plan.makes_subject and not await asyncio.to_thread(self.store.exists, record_key(plan.subject_id)):
            # Deleted while its images were being made: leave nothing behind, report it gone.
            await asyncio.to_thread(self.store.delete_prefix, images_prefix(plan.subject_id, plan.request_id))
            raise not_found(f"subject {plan.subject_id} was deleted while its images were made")
        finished = time.perf_counter()
        timings = {**(anchors.timings if anchors else {}), "images_s": finished - anchors_done,
                   "total_s": finished - started}
        if anchors is not None:
            timings["anchors_s"] = anchors_done - started
        if first_new:
            timings["first_image_s"] = min(first_new) - started
        if plan.makes_subject and (anchors is not None or first_new):
            observe_time_to_consistent_subject((min(first_new) if first_new else anchors_done) - started)
        return Outcome(plan.subject_id, images, timings)

    async def _anchors(self, plan: Plan, sink: Optional[ProgressSink], patient: bool) -> AnchorsResult:
        n = plan.n_anchors
        request = AnchorRequest(
            subject_id=plan.subject_id, prompts=plan.prompts[:n], subjects=plan.subjects, seed=plan.seeds[0],
            config=plan.config, owner=plan.owner, photos=plan.uploads.photos,
            controls=plan.uploads.anchor_controls(n), control_scale=plan.uploads.control_scale,
        )
        started = time.perf_counter()
        if sink is not None:
            stream = self.anchor_stage.options(stream=True).create_stream
            result = await call(lambda: _streamed(stream.remote(request), range(n), sink), "anchor stage",
                                self.retry_after_s, patient)
        else:
            made = asyncio.ensure_future(call(lambda: self.anchor_stage.create.remote(request), "anchor stage",
                                              self.retry_after_s))
            try:
                # Shielded: a client that leaves does not stop the anchors halfway through
                # persisting them (which would leave a subject whose id nobody has); they
                # finish, then go.
                result = await asyncio.shield(made)
            except asyncio.CancelledError:
                self._release_later(made, plan)
                raise
        elapsed = time.perf_counter() - started
        observe_stage("anchors", elapsed)
        count_images("anchor", len(result.pngs))
        self.refs.put(plan.subject_id, result.cache)
        result.timings["anchors_call_s"] = elapsed
        return result

    def _release_later(self, made: asyncio.Future, plan: Plan) -> None:
        undo = asyncio.ensure_future(self._release_when_done(made, plan))
        self._undoing.add(undo)  # the loop holds tasks weakly: keep it until it is done
        undo.add_done_callback(self._undoing.discard)

    async def _release_when_done(self, made: asyncio.Future, plan: Plan) -> None:
        try:
            await made
        except BaseException:
            pass  # a failed anchor batch persists nothing (the AnchorStage cleans up after itself)
        await self.release(plan)

    async def _new_image(self, plan: Plan, index: int, sink: Optional[ProgressSink], patient: bool) -> MadeImage:
        control = plan.uploads.control(index)
        cache = self.refs.get(plan.subject_id)
        request = ImageRequest(
            subject_id=plan.subject_id, prompt=plan.prompts[index], seed=plan.seeds[index], control=control,
            control_scale=plan.uploads.control_scale if control is not None else DEFAULT_CONTROL_SCALE,
            cache=cache,
        )
        handle = self.generator.options(multiplexed_model_id=plan.subject_id)
        if sink is not None:
            stream = handle.options(stream=True).generate_stream
            make: Callable[[], Awaitable[ImageResult]] = lambda: _streamed(stream.remote(request), [index], sink)
        else:
            make = lambda: handle.generate.remote(request)  # noqa: E731
        result = await call(make, "generator", self.retry_after_s, patient)
        count_images("new")
        if cache is not None and result.cache_source in ("artifact_store", "rebuilt"):
            self.refs.drop(plan.subject_id)  # its owner is gone; later calls go to the store directly
        return await self._store(plan, index, result.seed, result.png, sink)

    async def _store(self, plan: Plan, index: int, seed: int, png: bytes,
                     sink: Optional[ProgressSink]) -> MadeImage:
        image = MadeImage(index=index, prompt=plan.prompts[index], seed=seed,
                          key=image_key(plan.subject_id, plan.request_id, index), png=png)
        started = time.perf_counter()
        write = asyncio.ensure_future(asyncio.to_thread(self.store.put, image.key, png, "image/png"))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            # A write already under way lands before whoever cancelled cleans up the subject.
            await asyncio.gather(write, return_exceptions=True)
            raise
        observe_stage("store", time.perf_counter() - started)
        if sink is not None:
            await sink.stored(image)
        return image


async def _streamed(stream: AsyncIterator[Any], indices: Sequence[int], sink: ProgressSink) -> Any:
    """The result at the end of a streamed call, its steps told to the sink on the way. A caller
    that stops (a job cancelled) cancels the call itself, so that the model replica stops at its
    next step rather than making, and storing, what nobody will take."""
    try:
        async for item in stream:
            if isinstance(item, StepProgress):
                await sink.step(indices, item)
            else:
                return item
    except asyncio.CancelledError:
        cancel = getattr(stream, "cancel", None)  # a Serve DeploymentResponseGenerator's
        if cancel is not None:
            cancel()
        raise
    raise RuntimeError("the model replica ended its stream without a result")
