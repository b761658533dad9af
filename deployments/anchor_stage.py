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
from typing import Any, Optional

from ray import serve

from .cache_transport import put_cache
from .images import encode_png
from .messages import AnchorsResult, CacheHandle
from .models import ModelReplica
from .progress_stream import with_progress
from .subjects import SubjectRecord, cache_key, save_record, sha256_of, store_inputs, subject_prefix
from .uploads import DEFAULT_SCALE, open_pngs


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
    async def create_stream(self, subject_id: str, prompts: list[str], subjects: list[str], seed: int,
                            config: dict[str, Any], owner: Optional[str] = None, **uploads: Any):
        """`create`, streamed: step progress events, then the AnchorsResult (progress_stream.py)."""
        async for item in with_progress(
            lambda on_step: self.create(subject_id, prompts, subjects, seed, config, owner, on_step, **uploads)
        ):
            yield item

    async def create(
        self, subject_id: str, prompts: list[str], subjects: list[str], seed: int, config: dict[str, Any],
        owner: Optional[str] = None, progress=None, photos: Optional[list[Optional[bytes]]] = None,
        controls: Optional[list[Optional[bytes]]] = None, control_scale: float = DEFAULT_SCALE,
    ) -> AnchorsResult:
        """The anchors; `photos` (one per anchor prompt) and `controls` (one per prompt) are PNG
        bytes or None, as `uploads.decode_uploads` makes them."""
        from consistory import ConsiStoryConfig

        started = time.perf_counter()
        pipe = self.runner.pipeline
        out = await self.runner.run(
            pipe.create_anchors,
            prompts,
            subjects,
            seed,
            ConsiStoryConfig.from_dict(config),
            output_type="pil",
            # Off the GPU: the cache is serialized right away, and GPU memory is for the next batch.
            cache_device="cpu",
            cache_codec=self.settings.cache_codec,
            progress=progress,
            images=await asyncio.to_thread(open_pngs, photos),
            control_images=await asyncio.to_thread(open_pngs, controls),
            controlnet_conditioning_scale=control_scale,
        )
        generated = time.perf_counter()
        pngs, handle = await asyncio.to_thread(self._persist, subject_id, out, owner, photos, controls,
                                               control_scale if controls else None)
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

    def _persist(self, subject_id: str, out, owner: Optional[str], photos, controls, control_scale: Optional[float]
                 ) -> tuple[list[bytes], CacheHandle]:
        # The cache and the uploaded images first, the record last: a record in the store means
        # a complete subject. The store and the object store get the same chunks.
        buffers = out.cache.to_buffers(self.settings.cache_chunk_bytes)
        try:
            self.store.put_parts(cache_key(subject_id), list(buffers), "application/octet-stream")
            save_record(self.store, record_for(
                subject_id, out.cache, buffers, owner,
                photos=store_inputs(self.store, subject_id, "photo", photos),
                controls=store_inputs(self.store, subject_id, "control", controls),
                control_scale=control_scale,
            ))
        except BaseException:
            # A store that refused a write (a full disk, say) leaves no half subject behind.
            self.store.delete_prefix(subject_prefix(subject_id))
            raise
        return [encode_png(image) for image in out.images], put_cache(buffers)
