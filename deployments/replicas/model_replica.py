"""Loading the ConsiStory pipeline inside a model replica, as the settings say."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, TypeVar

from ..artifact_store import artifact_store_from_config
from ..settings import ServiceSettings

logger = logging.getLogger("ray.serve")
T = TypeVar("T")


def placement(device: str) -> str:
    """The device a replica loads its model on: `device`, where "auto" is CUDA if torch sees it,
    else the CPU, saying so where Ray assigned this replica GPUs that torch cannot see (a
    simulated cluster, a CPU-only torch on a GPU node): the replica still works, slowly."""
    from consistory.loading import resolve_device

    place = str(resolve_device(device))
    gpus = _gpus_from_ray()
    if device == "auto" and place == "cpu" and gpus:
        logger.warning("Ray assigned GPU %s but torch sees no CUDA device; running the model on the CPU",
                       ",".join(gpus))
    return place


def _gpus_from_ray() -> list[str]:
    import ray

    if not ray.is_initialized():
        return []
    return [str(g) for g in ray.get_gpu_ids()]


def load_pipeline(settings: ServiceSettings):
    """The pipeline on its device with progress bars off (replica logs are not terminals)."""
    import torch

    from consistory import loading

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    # "preset:tiny" as the ControlNet builds the seeded random one of the CLI's `--controlnet tiny`.
    pipe = loading.load_pipeline(settings.model, placement(settings.device), settings.dtype, settings.variant,
                                 controlnet=settings.controlnet, compile=settings.compile)
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s on %s (%s)%s", pipe.model_id, pipe.device, pipe.dtype,
                f" with ControlNet {settings.controlnet}" if settings.controlnet else "")
    return pipe


class PipelineRunner:
    """Runs pipeline calls one at a time, off the replica's event loop.

    The pipeline installs its attention processors on the shared UNet for the length of a call,
    so two calls on one pipeline must never overlap; running them in a worker thread keeps the
    replica answering health checks and routing-info pushes meanwhile.
    """

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline
        # One worker thread: calls queue in order, and a cancelled request (client gone, proxy
        # timeout) can never let a second call start while its own is still running, which an
        # asyncio.Lock around asyncio.to_thread would (the lock is released, the thread runs on).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="consistory")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))


class ModelReplica:
    """What the AnchorStage and the Generator share: their settings, the pipeline (loaded once
    per replica, called through a PipelineRunner), the artifact store, and the readiness probe."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.started_at = time.time()  # wall clock: compared with other processes' (scale-up timings)
        self.settings = ServiceSettings.model_validate(settings)
        self.runner = PipelineRunner(load_pipeline(self.settings))
        self.model_load_s = time.time() - self.started_at
        self.store = artifact_store_from_config(self.settings.store)
        self.warm_up_s: dict[int, float] = {}
        if self.settings.warm_up:
            # In the constructor: Serve routes nothing to a replica before it returns, so no
            # user pays for the process's first generation (or for compiling, with `compile`).
            self.warm_up_s = self.warm_up()
            logger.info("warmed up at batch sizes %s in %s s", sorted(self.warm_up_s),
                        ", ".join(f"{s:.2f}" for s in self.warm_up_s.values()))

    def warm_up_batches(self) -> tuple[int, ...]:
        """The batch sizes this replica's calls run at, warmed before it is ready."""
        return (1,)

    def warm_up(self) -> dict[int, float]:
        """The library's warm-up at the default request's size, for each of `warm_up_batches`:
        seconds per batch size."""
        return self.runner.pipeline.warm_up(self.settings.base_config(), self.warm_up_batches())

    async def ready(self) -> dict[str, str]:
        pipe = self.runner.pipeline
        return {"model": pipe.model_id, "device": str(pipe.device), "dtype": str(pipe.dtype)}

