"""The model actor: one ConsiStory pipeline on one device, loaded once, making stories or parts
of them and writing the images straight to DEST (only small results go back to the driver).

Bad input (InputError from the library) comes back as a failed `PartResult`, never as an
exception: it is the story's fault, not the actor's, and is not retried.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import ray

from consistory.errors import InputError

from .destination import Destination
from .plans import StoryPlan
from .story_output import story_record, write_images, write_story


@dataclass(frozen=True)
class PartResult:
    """What an actor made of a story: the images at `indices` (prompt positions), or an error."""

    story_id: str
    indices: tuple[int, ...] = ()
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # the story's input is wrong: the message says what to fix
    model_id: str = ""  # as the pipeline names its model ("preset:tiny:0", a hub id, a directory)
    dtype: str = ""
    record: dict[str, Any] | None = None  # the story.json written (`make_story` only)


class StoryActor:
    def __init__(self, model: str, device: str, cache_only: bool, torch_threads: int, destination: Destination):
        import torch

        from consistory.loading import load_pipeline
        from consistory.cli.log_filters import quiet_library_warnings

        quiet_library_warnings()
        torch.set_num_threads(torch_threads)  # several actors share a node's cores: no oversubscription
        started = time.perf_counter()
        self.pipe = load_pipeline(model, device, cache_only=cache_only)
        self.pipe.set_progress_bar_config(disable=True)  # the driver shows progress
        self.load_s = time.perf_counter() - started
        self.store = destination.open()
        self.dtype = str(self.pipe.dtype).removeprefix("torch.")

    def info(self) -> dict[str, Any]:
        """Answers once the model is loaded (calls run in order, after __init__)."""
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "device": str(self.pipe.device),
                "model_id": self.pipe.model_id, "dtype": self.dtype, "load_s": self.load_s}

    def make_story(self, plan: StoryPlan) -> PartResult:
        """The whole story in one batch (`--mode story`), its grid and its story.json."""
        started = time.perf_counter()
        spec = plan.spec
        try:
            out = self.pipe.generate_story(list(spec.prompts), list(spec.subjects), seed=spec.seed, config=plan.config)
        except InputError as error:
            return PartResult(plan.id, error=str(error))
        indices = tuple(range(len(spec.prompts)))
        write_images(self.store, plan, out.images, indices)
        record = story_record(plan, self.pipe.model_id, self.dtype, "story", out.timings)
        write_story(self.store, out.images, record)
        return self._made(plan, indices, started, out.timings, record)

    @ray.method(num_returns=2)
    def make_anchors(self, plan: StoryPlan):
        """The story's anchors (`--mode anchors`): their images in DEST, and the anchor cache as
        a second return value, which stays in the object store for `extend` calls to read."""
        started = time.perf_counter()
        spec = plan.spec
        n = plan.n_anchors
        try:
            out = self.pipe.create_anchors(list(spec.prompts[:n]), list(spec.subjects), seed=spec.seed,
                                           config=plan.config, cache_device="cpu")
        except InputError as error:
            return PartResult(plan.id, error=str(error)), None
        indices = tuple(range(n))
        write_images(self.store, plan, out.images, indices)
        return self._made(plan, indices, started, out.timings), out.cache.to_buffers()

    def extend(self, plan: StoryPlan, indices: Sequence[int], buffers) -> PartResult:
        """New images of the story from its anchor cache: prompts at `indices`, seeds seed + index,
        the same images as in the one-batch story."""
        from consistory.cache.anchor_cache import AnchorCache

        started = time.perf_counter()
        cache = AnchorCache.from_buffers(buffers.header, buffers.chunks)
        prompts = [plan.spec.prompts[i] for i in indices]
        try:
            out = self.pipe.generate_from_anchors(cache, prompts, seeds=[plan.seeds[i] for i in indices])
        except InputError as error:
            return PartResult(plan.id, error=str(error))
        write_images(self.store, plan, out.images, indices)
        return self._made(plan, indices, started, out.timings)

    def _made(self, plan: StoryPlan, indices: Sequence[int], started: float, timings: dict[str, float],
              record: dict[str, Any] | None = None) -> PartResult:
        return PartResult(plan.id, tuple(indices), time.perf_counter() - started, timings,
                          model_id=self.pipe.model_id, dtype=self.dtype, record=record)
