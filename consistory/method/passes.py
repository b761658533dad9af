"""The two passes (docs/method.md section 8) of one generation on a stock SDXL pipeline.

Every entry point of `ConsiStoryPipeline` ends here; they differ only in where the anchors come
from (`LiveAnchors` in the batch or `CachedAnchors` from a cache) and in the images given with
the prompts. The method's processors, FreeU and the DIFT hook are installed for the duration of
the passes and always removed afterwards, even on error, so the wrapped pipeline is left as it
was.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from ..config import ConsiStoryConfig
from ..errors import InputError
from ..inputs.image_inputs import ImageInputs
from ..outputs import StoryOutput
from ..progress import ProgressCallback, step_progress
from ..seeds import initial_latents
from .anchors import AnchorSource
from .denoise import Conditioning, denoise_pass, dift_hook, encode_conditioning, nearest_step
from .grids import Grids
from .processors import build_processors
from .run_state import RunState
from .subject_tokens import find_subject_tokens
from .vae import decode_latents

FREEU_KEYS = ("s1", "s2", "b1", "b2")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class Request:
    """One generation: its prompts and seeds, and where its anchors come from."""

    prompts: list[str]
    subjects: list[str]
    seeds: list[int]
    config: ConsiStoryConfig
    anchors: AnchorSource
    inputs: ImageInputs  # photos and control images given with the prompts
    latents: torch.Tensor | None = None  # (B, C, h, w) instead of the seeds' noise
    output_type: str = "pil"
    progress: ProgressCallback | None = None


def run_passes(sdxl, request: Request, controlnet=None, show_progress: bool = True,
               resume_pass2: bool = True) -> StoryOutput:
    """Generate `request` with the method on `sdxl`. `resume_pass2`: pass 2 starts from pass 1's
    state at step S // 10 (exact); False runs it from step 0, the same images at the cost of the
    repeated steps."""
    config, device = request.config, sdxl.unet.device
    if request.output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type must be 'pil', 'np', 'pt' or 'latent' (got {request.output_type!r})")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    grids = Grids.for_image(config.height, config.width, sdxl.vae_scale_factor)
    latents = _initial_latents(sdxl.unet, request.seeds, grids, request.latents)
    n_out = len(request.prompts)
    request, latents = _padded(request, latents)
    tokens = find_subject_tokens(sdxl.tokenizer, request.prompts, request.subjects)
    scheduler = type(sdxl.scheduler).from_config(sdxl.scheduler.config)
    scheduler.set_timesteps(config.num_inference_steps, device=device)
    latents = latents * scheduler.init_noise_sigma  # 1 for DDIM; not for e.g. Euler
    state = RunState(
        config=config,
        grids=grids,
        n_images=len(request.prompts),
        token_weights=tokens.weights().to(device),
        present=tokens.present.to(device),
        anchors=request.anchors,
        seeds=request.seeds,
        dift_step=nearest_step(scheduler.timesteps, config.dift_timestep),
    )
    # Pass 2 resumes from pass 1's state where injection starts (see PassSnapshot).
    resume_at = config.injection_steps().start if config.two_passes and resume_pass2 else None
    with torch.no_grad(), step_progress(show_progress, config, resume_at, state, request.progress) as step_done:
        cond = encode_conditioning(sdxl, request.prompts, config.height, config.width, device)
        control = request.inputs.control_signal(controlnet, config.height, config.width, sdxl.vae_scale_factor,
                                                device)
        timings["encode_s"] = time.perf_counter() - start
        photos = None
        if request.inputs.photos is not None:
            t0 = time.perf_counter()
            with freeu_installed(sdxl.unet, config):  # the model the rows are sampled with, no mechanism
                photos = request.inputs.invert_photos(sdxl, scheduler, cond, latents, request.seeds, config, control,
                                                      device)
            latents = latents.clone()
            latents[photos.rows] = photos.x_T.to(latents.dtype)
            timings["inversion_s"] = time.perf_counter() - t0
        with method_installed(sdxl.unet, state, config):
            result = _two_passes(sdxl, scheduler, state, latents, cond, resume_at, timings,
                                 on_step=step_done, control=control, photos=photos)
        result = result[:n_out]  # without the throwaway rows of a batch with photos (_padded)
        t0 = time.perf_counter()
        images = result if request.output_type == "latent" else decode_latents(sdxl, result, request.output_type)
        timings["decode_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start
    masks = [m.reshape(grids.coarse).cpu().numpy() for m in state.final_masks["coarse"][:n_out]]
    return StoryOutput(images=images, seeds=list(request.seeds[:n_out]), subject_masks=masks, timings=timings)


def _padded(request: Request, latents: torch.Tensor) -> tuple[Request, torch.Tensor]:
    """`request` and its initial latents with the throwaway rows a batch that holds photos runs
    with (`ImageInputs.batch_rows`; its anchors were built for that many rows): copies of the last
    row, not anchors, so no row attends to them; they are sliced off before anything is returned."""
    n = len(request.prompts)
    extra = request.inputs.batch_rows(n) - n
    if extra == 0:
        return request, latents
    padded = replace(request, prompts=request.prompts + request.prompts[-1:] * extra,
                     seeds=request.seeds + request.seeds[-1:] * extra, inputs=request.inputs.padded(n + extra))
    return padded, torch.cat([latents, latents[-1:].expand(extra, *latents.shape[1:])])


def _two_passes(sdxl, scheduler, state: RunState, latents: torch.Tensor, cond: Conditioning, resume_at: int | None,
                timings: dict[str, float], **rows) -> torch.Tensor:
    """Pass 1, then (with feature injection) pass 2 from the snapshot of pass 1 at `resume_at`,
    or from step 0 where there is none; the final latents."""
    steps = state.config.num_inference_steps
    t0 = time.perf_counter()
    scheduler.set_timesteps(steps, device=sdxl.unet.device)
    state.begin_pass(1)
    result, snapshot = denoise_pass(sdxl, scheduler, state, latents, cond, snapshot_at=resume_at, **rows)
    timings["pass1_s"] = time.perf_counter() - t0
    if not state.config.two_passes:
        return result
    t0 = time.perf_counter()
    if snapshot is not None:
        state.begin_pass(2, resume=snapshot)
        result, _ = denoise_pass(sdxl, snapshot.scheduler, state, snapshot.latents, cond, start=snapshot.step, **rows)
    else:
        scheduler.set_timesteps(steps, device=sdxl.unet.device)
        state.begin_pass(2)
        result, _ = denoise_pass(sdxl, scheduler, state, latents, cond, **rows)
    timings["pass2_s"] = time.perf_counter() - t0
    return result


def _initial_latents(unet, seeds: list[int], grids: Grids, latents: torch.Tensor | None) -> torch.Tensor:
    expected = (len(seeds), unet.config.in_channels, *grids.latent)
    if latents is None:
        return initial_latents(seeds, expected[1:], unet.dtype, unet.device)
    if tuple(latents.shape) != expected:
        raise InputError(f"latents must have shape {expected} (B, C, H/8, W/8); got {tuple(latents.shape)}")
    return latents.to(device=unet.device, dtype=unet.dtype)


@contextmanager
def method_installed(unet, state: RunState, config: ConsiStoryConfig) -> Iterator[None]:
    """The method's attention processors, FreeU as `config` says and the DIFT hook, on `unet`."""
    originals = unet.attn_processors
    try:
        # set_attn_processor empties the dict it is given: always hand it a copy.
        unet.set_attn_processor(dict(build_processors(dict(originals), state)))
        with freeu_installed(unet, config), dift_hook(unet, state):
            yield
    finally:
        unet.set_attn_processor(dict(originals))


@contextmanager
def freeu_installed(unet, config: ConsiStoryConfig) -> Iterator[None]:
    """FreeU on or off as `config` says, and the UNet's own FreeU settings back afterwards."""
    freeu_before = [{k: getattr(block, k, None) for k in FREEU_KEYS} for block in unet.up_blocks]
    try:
        if config.freeu:
            unet.enable_freeu(s1=config.freeu_s1, s2=config.freeu_s2, b1=config.freeu_b1, b2=config.freeu_b2)
        else:
            unet.disable_freeu()
        yield
    finally:
        for block, values in zip(unet.up_blocks, freeu_before):
            for k, v in values.items():
                setattr(block, k, v)
