"""AnchorStage: one anchor batch per new subject; the serial part of the service.

It answers with the anchor images (PNG bytes) and a `CacheHandle`: the anchor cache's header and
one ObjectRef per chunk (inside the handle the refs travel as references, so the cache's bytes
never pass through the Ingress). This replica owns those objects: if it dies, they die with it,
which is why the cache and the subject record are persisted to the artifact store before the
answer, and Generators know how to get them back.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Optional

from ray import serve

from ..flow.inputs import store_inputs
from ..flow.subjects import SubjectRecord, cache_key, save_record, sha256_of, subject_prefix
from ..images import encode_png, open_pngs
from ..messages import AnchorRequest, AnchorsResult, AnchorStreamItem, CacheHandle
from .cache_transport import put_cache
from .model_replica import ModelReplica
from .progress_stream import with_progress


def record_for(subject_id: str, cache, buffers, owner: Optional[str] = None, **inputs: Any) -> SubjectRecord:
    """The subject record, read off the cache itself so the two can never disagree; `inputs`:
    the stored photos and controls with the controls' scale (`SubjectRecord`'s fields)."""
    return SubjectRecord(
        **inputs,
        subject_id=subject_id,
        subjects=list(cache.subjects),
        prompts=list(cache.anchor_prompts),
        seeds=list(cache.seeds),
        config=cache.config.to_dict(),
        model=cache.model_id,
        created_at=time.time(),
        cache_key=cache_key(subject_id),
        cache_nbytes=buffers.nbytes,
        cache_codec=cache.codec,
        cache_sha256=sha256_of(buffers),
        owner=owner,
    )


@serve.deployment(name="AnchorStage")
class AnchorStage(ModelReplica):
    def warm_up_batches(self) -> tuple[int, ...]:
        return (self.settings.defaults.n_anchors,)  # a request's anchors are one batch

    async def create_stream(self, request: AnchorRequest) -> AsyncIterator[AnchorStreamItem]:
        """`create`, streamed: each step's progress, then the AnchorsResult (progress_stream.py)."""
        async for item in with_progress(lambda on_step: self.create(request, on_step)):
            yield item

    async def create(self, request: AnchorRequest, progress=None) -> AnchorsResult:
        """The subject's anchors, persisted with its record before the answer."""
        started = time.perf_counter()
        pipe = self.runner.pipeline
        out = await self.runner.run(
            pipe.create_anchors,
            list(request.prompts),
            list(request.subjects),
            request.seed,
            request.config,
            output_type="pil",
            # Off the GPU: the cache is serialized right away, and GPU memory is for the next batch.
            cache_device="cpu",
            cache_codec=self.settings.cache_codec,
            progress=progress,
            images=await asyncio.to_thread(open_pngs, request.photos),
            control_images=await asyncio.to_thread(open_pngs, request.controls),
            controlnet_conditioning_scale=request.control_scale,
        )
        generated = time.perf_counter()
        pngs, handle = await asyncio.to_thread(self._persist, request, out)
        return AnchorsResult(
            pngs=pngs,
            seeds=list(out.seeds),
            cache=handle,
            timings={
                **{f"anchor_{k}": v for k, v in out.timings.items()},
                "anchor_persist_s": time.perf_counter() - generated,
                "anchor_stage_s": time.perf_counter() - started,
            },
        )

    def _persist(self, request: AnchorRequest, out) -> tuple[list[bytes], CacheHandle]:
        # The cache and the uploaded images first, the record last: a record in the store means
        # a complete subject. The store and the object store get the same chunks.
        subject_id, prefix = request.subject_id, subject_prefix(request.subject_id)
        buffers = out.cache.to_buffers(self.settings.cache_chunk_bytes)
        try:
            self.store.put_parts(cache_key(subject_id), list(buffers), "application/octet-stream")
            save_record(self.store, record_for(
                subject_id, out.cache, buffers, request.owner,
                photos=store_inputs(self.store, prefix, "photo", request.photos),
                controls=store_inputs(self.store, prefix, "control", request.controls),
                control_scale=request.control_scale if request.controls else None,
            ))
        except BaseException:
            # A store that refused a write (a full disk, say) leaves no half subject behind.
            self.store.delete_prefix(prefix)
            raise
        return [encode_png(image) for image in out.images], put_cache(buffers)
