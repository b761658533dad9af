"""Generator: new images of a subject from its anchor cache, one image per call.

Reached through Serve's model multiplexing with the subject id as the model id, so requests
for a subject go to replicas that already hold its cache; each replica keeps caches up to
`cache_lru_bytes` (least recently used out first). A cache it does not hold comes, in this
order, from:
  1. the object store, through the `CacheHandle` the caller offers: read in place from the
     node's shared memory (dies with its owner);
  2. the artifact store (the AnchorStage persisted it before answering): a mapped file or one
     download buffer, checked against the sha256 in the subject record;
  3. a rebuild from the subject record: the anchors regenerated with the record's prompts,
     seeds and config are bit-identical, and so is their cache. It is persisted again, and the
     record updated. One replica rebuilds (it holds a lease in the store); the others wait.
Every cache is checked before use (its model, its settings, every tensor's name, dtype and shape),
and one that fails is rebuilt. So a request never fails because the replica that made a cache
is gone, or because the stored copy is damaged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time
from typing import Any, Optional

from ray import serve
from ray.exceptions import GetTimeoutError, ObjectLostError

from .artifact_store import ArtifactNotFound
from .cache_transport import get_cache
from .images import encode_png
from .messages import CacheHandle, ImageResult
from .metrics import count_cache_use, observe_stage, set_cache_bytes
from .models import ModelReplica
from .progress_stream import with_progress
from .subjects import (
    SubjectRecord,
    acquire_rebuild_lease,
    cache_key,
    load_record,
    rebuild_lease_held,
    record_key,
    release_rebuild_lease,
    save_record,
    sha256_of,
    subject_prefix,
)
from .uploads import DEFAULT_SCALE, open_png, rebuild_inputs

logger = logging.getLogger("ray.serve")

# Serve keeps a replica's multiplexed models in this attribute of the loader function.
_MULTIPLEX_ATTRIBUTE = "__serve_multiplex_wrapper"
# A count bound far above any byte budget's worth of caches: the byte budget does the evicting.
_MAX_SUBJECTS = 1024


class LoadedCache:
    """An anchor cache on this replica, and where it came from."""

    def __init__(self, cache, source: str, handle: Optional[CacheHandle] = None) -> None:
        self.cache = cache
        self.nbytes = cache.nbytes
        self.handle = handle  # keeps the chunks it reads in place referenced
        self._source: Optional[str] = source

    def take_source(self) -> str:
        """How the cache got here for the first call that uses it; "replica" after that."""
        source, self._source = self._source, None
        return source or "replica"


@serve.deployment(name="Generator")
class Generator(ModelReplica):
    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__(settings)
        # Handles offered by callers, read by the loader (which only receives the subject id).
        self._offered: dict[str, CacheHandle] = {}

        async def load(subject_id: str) -> LoadedCache:
            return await self._load(subject_id)

        self._load_fn = load
        self._cache_for = serve.multiplexed(max_num_models_per_replica=_MAX_SUBJECTS)(load)
        self._replica_name = f"{socket.gethostname()}:{os.getpid()}"
        # Where each subject's cache came from, each time this replica loaded it: what an
        # operator (or a test) reads to see caches cross nodes once, or come from the store.
        self.loads: dict[str, dict[str, int]] = {}
        self.load_seconds: dict[str, float] = {}  # the latest load of each subject's cache
        self.first_image_at: Optional[float] = None  # wall clock, when this replica's first image was done
        self.rebuilds = 0  # caches this replica rebuilt
        self.rebuilt_by_others = 0  # caches it waited for while another replica rebuilt them

    async def generate_stream(self, cache: Optional[CacheHandle], prompt: str, seed: int, **control: Any):
        """`generate`, streamed: step progress events, then the ImageResult (progress_stream.py)."""
        async for item in with_progress(lambda on_step: self.generate(cache, prompt, seed, on_step, **control)):
            yield item

    async def generate(self, cache: Optional[CacheHandle], prompt: str, seed: int, progress=None,
                       control: Optional[bytes] = None, control_scale: float = DEFAULT_SCALE) -> ImageResult:
        """One new image of the subject named by the request's multiplexed model id; `control`:
        PNG bytes of a ControlNet control for it, or None."""
        subject_id = serve.get_multiplexed_model_id()
        if not subject_id:
            raise RuntimeError("Generator.generate needs handle.options(multiplexed_model_id=<subject id>)")
        started = time.perf_counter()
        if cache is not None:
            self._offered[subject_id] = cache
        try:
            loaded = await self._cache_for(subject_id)
        finally:
            self._offered.pop(subject_id, None)  # never pin an object longer than needed
        await self._evict_over_budget()
        source = loaded.take_source()
        cache_ready = time.perf_counter()
        if source != "replica":
            counts = self.loads.setdefault(subject_id, {})
            counts[source] = counts.get(source, 0) + 1
            self.load_seconds[subject_id] = cache_ready - started
        count_cache_use(source)
        observe_stage("cache_load", cache_ready - started)
        set_cache_bytes(sum(m.nbytes for m in self._multiplexed_models().values()), self._replica_name)
        pipe = self.runner.pipeline
        controls = None if control is None else [await asyncio.to_thread(open_png, control)]
        out = await self.runner.run(pipe.generate_from_anchors, loaded.cache, [prompt], [seed], output_type="pil",
                                    progress=progress, control_images=controls,
                                    controlnet_conditioning_scale=control_scale)
        png = await asyncio.to_thread(encode_png, out.images[0])
        observe_stage("generation", time.perf_counter() - cache_ready)
        self.first_image_at = self.first_image_at or time.time()
        return ImageResult(
            png=png,
            seed=out.seeds[0],
            cache_source=source,
            timings={"cache_s": cache_ready - started, **out.timings, "generator_s": time.perf_counter() - started},
        )

    async def cache_stats(self) -> dict[str, Any]:
        """The caches this replica holds (subjects, least recently used first, and bytes), where
        they came from, and which replica on which node is answering."""
        import ray

        models = self._multiplexed_models()
        return {"subjects": list(models), "bytes": sum(m.nbytes for m in models.values()),
                "budget_bytes": self.settings.cache_lru_bytes, "rebuilds": self.rebuilds,
                "rebuilt_by_others": self.rebuilt_by_others, "loads": self.loads, "load_s": self.load_seconds,
                "replica": serve.get_replica_context().replica_id.unique_id,
                "node_id": ray.get_runtime_context().get_node_id(),
                "started_at": self.started_at, "model_load_s": self.model_load_s,
                "first_image_at": self.first_image_at}

    def _multiplexed_models(self) -> dict[str, LoadedCache]:
        wrapper = getattr(self._load_fn, _MULTIPLEX_ATTRIBUTE, None)
        return wrapper.models if wrapper is not None else {}

    async def _evict_over_budget(self) -> None:
        """Unload least recently used caches until the rest fit `cache_lru_bytes` (the one just
        used always stays)."""
        wrapper = getattr(self._load_fn, _MULTIPLEX_ATTRIBUTE, None)
        if wrapper is None:
            return
        while len(wrapper.models) > 1 and sum(m.nbytes for m in wrapper.models.values()) > self.settings.cache_lru_bytes:
            await wrapper.unload_model_lru()
            wrapper._push_multiplexed_replica_info = True  # tell the router what this replica holds now

    async def _load(self, subject_id: str) -> LoadedCache:
        handle = self._offered.get(subject_id)
        if handle is not None:
            cache = await self._from_object_store(subject_id, handle)
            if cache is not None:
                return LoadedCache(cache, "object_store", handle)
        record = await asyncio.to_thread(load_record, self.store, subject_id)
        cache = await asyncio.to_thread(self._from_artifact_store, record)
        if cache is not None:
            return LoadedCache(cache, "artifact_store")
        return LoadedCache(await self._rebuild(record), "rebuilt")

    def _usable(self, cache, subject_id: str, source: str):
        """The cache placed for use, or None if it is damaged, foreign or outdated (then the
        record rebuilds it: a cache of another model or settings would fail every request)."""
        from consistory import AnchorCacheError

        pipe = self.runner.pipeline
        try:
            cache.check_compatible(pipe.model_fingerprint, cache.config)
            cache.check_structure(pipe.sdxl.unet, pipe.sdxl.vae_scale_factor)
            return self._place(cache)
        except AnchorCacheError as error:
            logger.warning("subject %s: unusable cache from the %s (%s)", subject_id, source, error)
            return None

    async def _from_object_store(self, subject_id: str, handle: CacheHandle):
        from consistory import AnchorCacheError

        try:
            cache = await get_cache(handle, self.settings.object_fetch_timeout_s)
        except (ObjectLostError, GetTimeoutError, asyncio.TimeoutError) as error:
            # ObjectLostError covers OwnerDiedError, ObjectFreedError, ObjectFetchTimedOutError,
            # ReferenceCountingAssertionError and failed reconstruction.
            logger.warning("subject %s: cache object unavailable (%s); using the artifact store",
                           subject_id, type(error).__name__)
            return None
        except AnchorCacheError as error:
            logger.warning("subject %s: cache object unreadable (%s); using the artifact store", subject_id, error)
            return None
        return self._usable(cache, subject_id, "object store")

    def _from_artifact_store(self, record: SubjectRecord):
        """The stored cache, checked against the record's sha256; None if absent or unusable."""
        from consistory import AnchorCache, AnchorCacheError

        subject_id = record.subject_id
        try:
            data = self.store.get_buffer(cache_key(subject_id))
        except ArtifactNotFound:
            logger.warning("subject %s: no cache in the artifact store", subject_id)
            return None
        if record.cache_sha256 is not None and hashlib.sha256(data).hexdigest() != record.cache_sha256:
            logger.warning("subject %s: the stored cache does not match its record's sha256", subject_id)
            return None
        try:
            cache = AnchorCache.from_bytes(data)
        except AnchorCacheError as error:
            logger.warning("subject %s: unreadable stored cache (%s)", subject_id, error)
            return None
        return self._usable(cache, subject_id, "artifact store")

    async def _rebuild(self, record: SubjectRecord):
        """Rebuild the cache from the record, once across the service: the holder of the store's
        rebuild lease rebuilds, the others wait for it and read what it stored."""
        subject_id = record.subject_id
        owner = f"{self._replica_name}:{time.time()}"
        lease_s = self.settings.rebuild_lease_s
        deadline = time.monotonic() + lease_s
        while True:
            if await asyncio.to_thread(acquire_rebuild_lease, self.store, subject_id, owner, lease_s):
                try:
                    return await self._rebuild_here(record)
                finally:
                    await asyncio.to_thread(release_rebuild_lease, self.store, subject_id)
            logger.info("subject %s: another replica is rebuilding its cache; waiting for it", subject_id)
            while await asyncio.to_thread(rebuild_lease_held, self.store, subject_id):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"subject {subject_id}: its cache rebuild took over {lease_s:.0f} s")
                await asyncio.sleep(0.5)
            record = await asyncio.to_thread(load_record, self.store, subject_id)
            cache = await asyncio.to_thread(self._from_artifact_store, record)
            if cache is not None:
                self.rebuilt_by_others += 1
                return cache

    async def _rebuild_here(self, record: SubjectRecord):
        from consistory import ConsiStoryConfig

        logger.warning("subject %s: rebuilding its cache from the record", record.subject_id)
        inputs = await asyncio.to_thread(rebuild_inputs, self.store, record)  # photos and controls
        pipe = self.runner.pipeline
        out = await self.runner.run(
            pipe.create_anchors,
            record.prompts,
            record.subjects,
            record.seeds[0],
            ConsiStoryConfig.from_dict(record.config),
            output_type="latent",  # only the cache is wanted; skip decoding the anchors
            cache_device="cpu",
            cache_codec=self.settings.cache_codec,
            **inputs,
        )
        await asyncio.to_thread(self._persist_rebuilt, record, out.cache)
        self.rebuilds += 1
        return self._place(out.cache)

    def _place(self, cache):
        """The cache where `cache_memory` says: copied once to the model's device, or left where
        it lies in host memory (each layer is copied to the device as the loop needs it)."""
        if self.settings.cache_memory == "device":
            return cache.to(self.runner.pipeline.device)
        return cache

    def _persist_rebuilt(self, record: SubjectRecord, cache) -> None:
        """The cache, then the record with the new cache's checksum (a rebuild on other hardware
        may differ in the last bits), unless the subject was deleted meanwhile."""
        subject_id = record.subject_id
        buffers = cache.to_buffers(self.settings.cache_chunk_bytes)
        self.store.put_parts(cache_key(subject_id), list(buffers), "application/octet-stream")
        if not self.store.exists(record_key(subject_id)):
            # Deleted while it was being rebuilt: leave no cache without a record behind.
            self.store.delete_prefix(subject_prefix(subject_id))
            return
        save_record(self.store, record.model_copy(update={
            "cache_nbytes": buffers.nbytes, "cache_sha256": sha256_of(buffers), "cache_codec": cache.codec,
            "rebuilds": record.rebuilds + 1,
        }))
