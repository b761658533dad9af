"""Generator: new images of a subject from its anchor cache, one image per call.

Reached through Serve's model multiplexing with the subject id as the model id, so requests
for a subject go to replicas that already hold its cache; each replica keeps the last
`cache_lru_size` caches on its device (Serve's multiplex LRU). A cache it does not hold comes,
in this order, from:
  1. the object store, through the ObjectRef the caller offers (fast; dies with its owner);
  2. the artifact store (the AnchorStage persisted it before answering);
  3. a rebuild from the subject record: the anchors regenerated with the record's prompts,
     seeds and config are bit-identical, and so is their cache. It is persisted again.
So a request never fails because the replica that made a cache is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

from ray import serve
from ray.exceptions import GetTimeoutError, ObjectLostError

from .artifact_store import ArtifactNotFound
from .images import encode_png
from .models import ModelReplica
from .subjects import cache_key, load_record, record_key, subject_prefix

logger = logging.getLogger("ray.serve")


class LoadedCache:
    """An anchor cache on this replica's device, and where it came from."""

    def __init__(self, cache, source: str) -> None:
        self.cache = cache
        self._source: Optional[str] = source

    def take_source(self) -> str:
        """How the cache got here for the first call that uses it; "replica" after that."""
        source, self._source = self._source, None
        return source or "replica"


@serve.deployment(name="Generator")
class Generator(ModelReplica):
    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__(settings)
        # ObjectRefs offered by callers, read by the loader (which only receives the subject id).
        self._offered: dict[str, list[Any]] = {}

        async def load(subject_id: str) -> LoadedCache:
            return await self._load(subject_id)

        # Wired at init time because the LRU size is configuration, not code; Serve 2.60
        # detects a multiplexed function stored on the instance.
        self._cache_for = serve.multiplexed(max_num_models_per_replica=self.settings.cache_lru_size)(load)

    async def generate(self, cache_refs: Optional[list[Any]], prompt: str, seed: int) -> dict[str, Any]:
        """One new image of the subject named by the request's multiplexed model id."""
        subject_id = serve.get_multiplexed_model_id()
        if not subject_id:
            raise RuntimeError("Generator.generate needs handle.options(multiplexed_model_id=<subject id>)")
        started = time.perf_counter()
        if cache_refs:
            self._offered[subject_id] = cache_refs
        try:
            loaded = await self._cache_for(subject_id)
        finally:
            self._offered.pop(subject_id, None)  # never pin an object longer than needed
        source = loaded.take_source()
        cache_ready = time.perf_counter()
        pipe = self.runner.pipeline
        out = await self.runner.run(pipe.generate_from_anchors, loaded.cache, [prompt], [seed], output_type="pil")
        png = await asyncio.to_thread(encode_png, out.images[0])
        return {
            "png": png,
            "seed": out.seeds[0],
            "cache_source": source,
            "timings": {"cache_s": cache_ready - started, **out.timings, "generator_s": time.perf_counter() - started},
        }

    async def _load(self, subject_id: str) -> LoadedCache:
        from consistory import AnchorCache, AnchorCacheError

        data = await self._from_object_store(subject_id)
        source = "object_store"
        if data is None:
            source = "artifact_store"
            try:
                data = await asyncio.to_thread(self.store.get, cache_key(subject_id))
            except ArtifactNotFound:
                logger.warning("subject %s: no cache in the artifact store; rebuilding it", subject_id)
                return LoadedCache(await self._rebuild(subject_id), "rebuilt")
        try:
            cache = await asyncio.to_thread(lambda: self._place(AnchorCache.from_bytes(data, "cpu")))
            # A cache of another model or settings (weights changed under the same id, say)
            # would fail every request for this subject; the record rebuilds a fitting one.
            cache.check_compatible(self.runner.pipeline.model_fingerprint, cache.config)
            return LoadedCache(cache, source)
        except AnchorCacheError as error:  # a damaged or outdated artifact: the record still holds
            logger.warning("subject %s: unusable cache from the %s (%s); rebuilding it", subject_id, source, error)
            return LoadedCache(await self._rebuild(subject_id), "rebuilt")

    async def _from_object_store(self, subject_id: str) -> Optional[bytes]:
        refs = self._offered.get(subject_id)
        if not refs:
            return None
        try:
            return await asyncio.wait_for(refs[0], timeout=self.settings.object_fetch_timeout_s)
        except (ObjectLostError, GetTimeoutError, asyncio.TimeoutError) as error:
            # ObjectLostError covers OwnerDiedError, ObjectFreedError, ObjectFetchTimedOutError,
            # ReferenceCountingAssertionError and failed reconstruction.
            logger.warning("subject %s: cache object unavailable (%s); using the artifact store",
                           subject_id, type(error).__name__)
            return None

    async def _rebuild(self, subject_id: str):
        from consistory import ConsiStoryConfig

        record = await asyncio.to_thread(load_record, self.store, subject_id)
        pipe = self.runner.pipeline
        out = await self.runner.run(
            pipe.create_anchors,
            record.prompts,
            record.subjects,
            record.seeds[0],
            ConsiStoryConfig.from_dict(record.config),
            output_type="latent",  # only the cache is wanted; skip decoding the anchors
        )
        await asyncio.to_thread(self._persist_rebuilt, subject_id, out.cache)
        return await asyncio.to_thread(self._place, out.cache)

    def _place(self, cache):
        """The cache where `cache_memory` says: on the model's device, or in host memory (pinned
        when the model is on a GPU, so per-layer copies overlap the denoising work)."""
        device = self.runner.pipeline.device
        if self.settings.cache_memory == "device":
            return cache.to(device)
        return cache.pin_memory() if device.type == "cuda" else cache.to("cpu")

    def _persist_rebuilt(self, subject_id: str, cache) -> None:
        self.store.put(cache_key(subject_id), cache.to_bytes(), "application/octet-stream")
        if not self.store.exists(record_key(subject_id)):
            # Deleted while it was being rebuilt: leave no cache without a record behind.
            self.store.delete_prefix(subject_prefix(subject_id))
