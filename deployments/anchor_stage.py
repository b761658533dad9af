"""AnchorStage: one anchor batch per new subject; the serial part of the service.

It answers with the anchor images (PNG bytes) and the anchor cache as an ObjectRef inside a
list (a bare ObjectRef in a result would be resolved by Ray; inside a list it travels as a
reference, so the cache's bytes never pass through the Ingress). This replica owns that object:
if it dies, the object dies with it, which is why the cache and the subject record are
persisted to the artifact store before the answer, and Generators know how to get them back.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray
from ray import serve

from .images import encode_png
from .models import ModelReplica
from .subjects import SubjectRecord, cache_key, save_record


def record_for(subject_id: str, cache, cache_nbytes: int) -> SubjectRecord:
    """The subject record, read off the cache itself so the two can never disagree."""
    return SubjectRecord(
        subject_id=subject_id,
        subjects=list(cache.subjects),
        prompts=list(cache.anchor_prompts),
        seeds=list(cache.seeds),
        config=cache.config.to_dict(),
        model=cache.model_id,
        created_at=time.time(),
        cache_key=cache_key(subject_id),
        cache_nbytes=cache_nbytes,
    )


@serve.deployment(name="AnchorStage")
class AnchorStage(ModelReplica):
    async def create(
        self, subject_id: str, prompts: list[str], subjects: list[str], seed: int, config: dict[str, Any]
    ) -> dict[str, Any]:
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
        )
        generated = time.perf_counter()
        pngs, cache_ref, cache_nbytes = await asyncio.to_thread(self._persist, subject_id, out)
        return {
            "images": pngs,
            "seeds": list(out.seeds),
            "cache": [cache_ref],
            "cache_nbytes": cache_nbytes,
            "timings": {
                **{f"anchor_{k}": v for k, v in out.timings.items()},
                "anchor_persist_s": time.perf_counter() - generated,
                "anchor_stage_s": time.perf_counter() - started,
            },
        }

    def _persist(self, subject_id: str, out) -> tuple[list[bytes], Any, int]:
        # The cache first, the record last: a record in the store means a complete subject.
        # The object store gets the same safetensors bytes, so every reader has one decoder.
        cache_bytes = out.cache.to_bytes()
        self.store.put(cache_key(subject_id), cache_bytes, "application/octet-stream")
        save_record(self.store, record_for(subject_id, out.cache, len(cache_bytes)))
        return [encode_png(image) for image in out.images], ray.put(cache_bytes), len(cache_bytes)
