"""Where a Generator gets a subject's anchor cache that it does not hold, in this order:

  1. the object store, through the `CacheHandle` the caller offers: read in place from the
     node's shared memory (dies with its owner);
  2. the artifact store (the AnchorStage persisted it before answering): a mapped file or one
     download buffer, checked against the sha256 in the subject record;
  3. a rebuild from the subject record: the anchors regenerated with the record's prompts,
     seeds, config and stored inputs are bit-identical, and so is their cache. It is persisted
     again, and the record updated. One replica rebuilds (it holds the subject's rebuild lease);
     the others wait for it and read what it stored.

Every cache is checked before use (its model, its settings, every tensor's name, dtype and
shape), and one that fails is rebuilt. So a request never fails because the replica that made a
cache is gone, or because the stored copy is damaged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any, Optional

from ray.exceptions import GetTimeoutError, ObjectLostError

from ..artifact_store import ArtifactNotFound, ArtifactStore
from ..errors import NotNow
from ..flow.inputs import MissingInput, load_inputs
from ..flow.leases import rebuild_lease
from ..flow.subjects import (
    SubjectRecord,
    cache_key,
    load_record,
    record_key,
    save_record,
    sha256_of,
    subject_prefix,
)
from ..images import open_pngs
from ..messages import DEFAULT_CONTROL_SCALE, CacheHandle
from ..settings import ServiceSettings
from .cache_transport import get_cache
from .model_replica import PipelineRunner

logger = logging.getLogger("ray.serve")


def placed(cache, settings: ServiceSettings, device):
    """The cache where `cache_memory` says: copied once to the model's device, or left where it
    lies in host memory (each layer is copied to the device as the loop needs it)."""
    if settings.cache_memory == "device":
        return cache.to(device)
    return cache


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


class CacheSources:
    def __init__(self, runner: PipelineRunner, store: ArtifactStore, settings: ServiceSettings, replica: str) -> None:
        self.runner, self.store, self.settings, self.replica = runner, store, settings, replica
        self.rebuilds = 0  # caches this replica rebuilt
        self.rebuilt_by_others = 0  # caches it waited for while another replica rebuilt them

    async def load(self, subject_id: str, handle: Optional[CacheHandle]) -> LoadedCache:
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
        # Checked and copied to the device off the event loop (gigabytes at 1024 px), so the
        # replica's other requests, their progress streams and Serve's health checks go on.
        return await asyncio.to_thread(self._usable, cache, subject_id, "object store")

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
        lease_s = self.settings.rebuild_lease_s
        lease = rebuild_lease(self.store, subject_id, f"{self.replica}:{time.time()}", lease_s)
        deadline = time.monotonic() + lease_s
        while True:
            if await asyncio.to_thread(lease.acquire):
                try:
                    return await self._rebuild_here(record)
                finally:
                    await asyncio.to_thread(lease.release)
            logger.info("subject %s: another replica is rebuilding its cache; waiting for it", subject_id)
            # Until the rebuilder releases the lease, or its lease expires (it died): then the
            # next acquire takes it over and this replica rebuilds.
            while await asyncio.to_thread(lease.held) and not await asyncio.to_thread(lease.expired):
                if time.monotonic() > deadline:
                    raise NotNow(f"subject {subject_id}'s cache is still being rebuilt after {lease_s:.0f} s; "
                                 "retry later")
                await asyncio.sleep(0.5)
            record = await asyncio.to_thread(load_record, self.store, subject_id)
            cache = await asyncio.to_thread(self._from_artifact_store, record)
            if cache is not None:
                self.rebuilt_by_others += 1
                return cache

    async def _rebuild_here(self, record: SubjectRecord):
        from consistory import ConsiStoryConfig

        logger.warning("subject %s: rebuilding its cache from the record", record.subject_id)
        inputs = await asyncio.to_thread(self._stored_inputs, record)
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
        return await asyncio.to_thread(self._place, out.cache)

    def _stored_inputs(self, record: SubjectRecord) -> dict[str, Any]:
        """`create_anchors` keyword arguments for the subject's stored photos and anchor controls
        (checked against their sha256) and the controls' scale. A subject whose inputs are gone
        cannot be rebuilt: InputError (422) saying to create it again."""
        from consistory.errors import InputError

        try:
            photos, controls = load_inputs(self.store, record.photos), load_inputs(self.store, record.controls)
        except MissingInput as error:
            raise InputError(f"subject {record.subject_id} cannot be rebuilt: {error}; its anchor cache is gone "
                             "too, so create the subject again with POST /v1/subjects") from None
        scale = record.control_scale if record.control_scale is not None else DEFAULT_CONTROL_SCALE
        return {"images": open_pngs(photos), "control_images": open_pngs(controls),
                "controlnet_conditioning_scale": scale}

    def _place(self, cache):
        return placed(cache, self.settings, self.runner.pipeline.device)

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
