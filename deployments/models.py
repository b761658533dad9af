"""Loading the ConsiStory pipeline inside a model replica, as the settings say."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, TypeVar

from .artifact_store import artifact_store_from_config
from .settings import PRESET_PREFIX, ServiceSettings, preset_name_and_seed

logger = logging.getLogger("ray.serve")
T = TypeVar("T")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        gpus = _gpus_from_ray()
        if gpus:
            # A node that declares GPUs it lacks (a simulated cluster, a CPU-only torch on a GPU
            # node): the replica still works, slowly, and the log says why.
            logger.warning("Ray assigned GPU %s but torch sees no CUDA device; running the model on the CPU",
                           ",".join(gpus))
        return "cpu"
    return device


def _gpus_from_ray() -> list[str]:
    import ray

    if not ray.is_initialized():
        return []
    return [str(g) for g in ray.get_gpu_ids()]


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        # SDXL in fp16 is the norm on GPUs; CPUs lack fast half-precision kernels.
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_pipeline(settings: ServiceSettings):
    """The pipeline on its device with progress bars off (replica logs are not terminals)."""
    import torch

    from consistory import ConsiStoryPipeline

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if settings.model.startswith(PRESET_PREFIX):
        name, seed = preset_name_and_seed(settings.model)
        pipe = ConsiStoryPipeline.from_preset(name, seed=seed, torch_dtype=dtype, device=device)
    else:
        kwargs: dict[str, Any] = {"torch_dtype": dtype}
        if settings.variant:
            kwargs["variant"] = settings.variant
        pipe = ConsiStoryPipeline.from_pretrained(settings.model, **kwargs).to(device)
    if settings.controlnet:
        from consistory.controlnets import load_controlnet

        # "preset:tiny" builds the seeded random ControlNet of the CLI's `--controlnet tiny`.
        pipe.controlnet = load_controlnet(settings.controlnet_id, pipe.sdxl.unet)
        logger.info("loaded ControlNet %s", settings.controlnet)
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s on %s (%s)", pipe.model_id, device, dtype)
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

    async def ready(self) -> dict[str, str]:
        pipe = self.runner.pipeline
        return {"model": pipe.model_id, "device": str(pipe.device), "dtype": str(pipe.dtype)}

