"""Generator: new images of a subject from its anchor cache, one `ImageRequest` per call.

Callers reach it through Serve's model multiplexing with the subject id as the model id, so a
subject's requests go to replicas that already hold its cache (replica_caches.py: the routing,
and an LRU of caches bounded by `cache_lru_bytes`). A cache this replica does not hold comes from
the object store, the artifact store or a rebuild (cache_sources.py). Concurrent requests of one
subject are made together, up to `generator.max_batch_images` per `generate_from_anchors` call
(batching.py); each still gets its own image, progress and errors.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, AsyncIterator, Hashable, Optional

from ray import serve

from ..images import encode_png, open_png
from ..messages import ImageRequest, ImageResult, ImageStreamItem
from ..metrics import count_cache_use, observe_batch, observe_stage, set_cache_bytes
from .batching import Batcher
from .cache_sources import CacheSources, LoadedCache, placed
from .model_replica import ModelReplica
from .progress_stream import with_progress
from .replica_caches import ReplicaCaches


@dataclass(frozen=True)
class ImageRow:
    """One request's row of a batch: what differs between the images of one call."""

    cache: Any  # the subject's AnchorCache, as this replica holds it
    prompt: str
    seed: int
    control: Any  # PIL image or None
    control_scale: float


@dataclass(frozen=True)
class RowResult:
    image: Any  # PIL image
    seed: int
    timings: dict[str, float]
    batch_images: int


@serve.deployment(name="Generator")
class Generator(ModelReplica):
    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__(settings)
        resources = self.settings.generator
        self.batcher: Batcher[ImageRow, RowResult] = Batcher(self._make_batch, resources.batch_size,
                                                             resources.batch_wait_ms / 1000)
        self.batch_sizes: Counter[int] = Counter()  # generate_from_anchors calls, by images in them
        self._replica_name = f"{socket.gethostname()}:{os.getpid()}"
        self.caches: ReplicaCaches[LoadedCache] = ReplicaCaches(self.settings.cache_lru_bytes)
        self.sources = CacheSources(self.runner, self.store, self.settings, self._replica_name)
        # Where each subject's cache came from, each time this replica loaded it: what an
        # operator (or a test) reads to see caches cross nodes once, or come from the store.
        self.loads: dict[str, dict[str, int]] = {}
        self.load_seconds: dict[str, float] = {}  # the latest load of each subject's cache
        self.first_image_at: Optional[float] = None  # wall clock, when this replica's first image was done

    async def generate_stream(self, request: ImageRequest) -> AsyncIterator[ImageStreamItem]:
        """`generate`, streamed: each step's progress, then the ImageResult (progress_stream.py)."""
        async for item in with_progress(lambda on_step: self.generate(request, on_step)):
            yield item

    async def generate(self, request: ImageRequest, progress=None) -> ImageResult:
        subject_id = request.subject_id
        if self.caches.routed_subject() != subject_id:
            raise RuntimeError("call Generator with handle.options(multiplexed_model_id=request.subject_id)")
        started = time.perf_counter()
        loaded = await self.caches.get(subject_id, lambda: self.sources.load(subject_id, request.cache))
        source = loaded.take_source()
        cache_ready = time.perf_counter()
        if source != "replica":
            counts = self.loads.setdefault(subject_id, {})
            counts[source] = counts.get(source, 0) + 1
            self.load_seconds[subject_id] = cache_ready - started
        count_cache_use(source)
        observe_stage("cache_load", cache_ready - started)
        set_cache_bytes(self.caches.nbytes, self._replica_name)
        control = None if request.control is None else await asyncio.to_thread(open_png, request.control)
        row = ImageRow(loaded.cache, request.prompt, request.seed, control, request.control_scale)
        made = await self.batcher.submit(request.batch_key, row, progress)
        png = await asyncio.to_thread(encode_png, made.image)
        observe_stage("generation", time.perf_counter() - cache_ready)
        self.first_image_at = self.first_image_at or time.time()
        return ImageResult(
            png=png,
            seed=made.seed,
            cache_source=source,
            timings={"cache_s": cache_ready - started, **made.timings, "generator_s": time.perf_counter() - started},
            batch_images=made.batch_images,
        )

    async def _make_batch(self, key: Hashable, rows: list[ImageRow], on_step) -> list[RowResult]:
        """One `generate_from_anchors` call for requests of one batch key: one subject (the
        first row's copy of its cache serves all) and one control scale."""
        pipe = self.runner.pipeline
        controls = [row.control for row in rows]
        out = await self.runner.run(pipe.generate_from_anchors, rows[0].cache, [row.prompt for row in rows],
                                    [row.seed for row in rows], output_type="pil", progress=on_step,
                                    control_images=None if all(c is None for c in controls) else controls,
                                    controlnet_conditioning_scale=rows[0].control_scale)
        self.batch_sizes[len(rows)] += 1
        observe_batch(len(rows))
        return [RowResult(image, seed, dict(out.timings), len(rows)) for image, seed in zip(out.images, out.seeds)]

    def warm_up_batches(self) -> tuple[int, ...]:
        # A compiled UNet makes its graphs per batch size: the one image and the full batch
        # are made before the replica is ready (sizes in between, at their first use).
        return tuple(sorted({1, self.settings.generator.batch_size}))

    def warm_up(self) -> dict[int, float]:
        """The library's warm-up, then one image from a cache in this service's codec and
        placement: the path every request takes (the cache's layers read and, compact, decoded
        on the device; the PNG encoded), run here first rather than for a user."""
        seconds = super().warm_up()
        pipe, config = self.runner.pipeline, self.settings.base_config()
        config = config.replace(num_inference_steps=min(config.num_inference_steps, 2))
        prompts = [f"a photo of a dog in scene {i}" for i in range(config.n_anchors)]
        anchors = pipe.create_anchors(prompts, ["dog"], seed=0, config=config, output_type="latent",
                                      cache_device="cpu", cache_codec=self.settings.cache_codec)
        cache = placed(anchors.cache, self.settings, pipe.device)
        encode_png(pipe.generate_from_anchors(cache, prompts[:1], output_type="pil").images[0])
        return seconds

    async def cache_stats(self) -> dict[str, Any]:
        """The caches this replica holds (subjects, least recently used first, and bytes), where
        they came from, and which replica on which node is answering."""
        import ray

        return {"subjects": self.caches.subjects, "bytes": self.caches.nbytes,
                "budget_bytes": self.caches.budget_bytes, "rebuilds": self.sources.rebuilds,
                "rebuilt_by_others": self.sources.rebuilt_by_others, "loads": self.loads,
                "load_s": self.load_seconds, "replica": serve.get_replica_context().replica_id.unique_id,
                "node_id": ray.get_runtime_context().get_node_id(), "started_at": self.started_at,
                "model_load_s": self.model_load_s, "first_image_at": self.first_image_at,
                "warm_up_s": self.warm_up_s, "batch_sizes": dict(self.batch_sizes)}
