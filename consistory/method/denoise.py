"""The denoising loop: diffusers' SDXL loop, with the vanilla forward of query mixing fused in.

It mirrors `StableDiffusionXLPipeline.__call__` (CFG rows [uncond, cond], the scheduler's own
`scale_model_input`/`step`) so that with every mechanism off the latents equal diffusers'.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from .compiled_unet import begin_forward
from .correspondence import freeu_backbone_scaled, smooth_features
from .run_state import PassSnapshot, RunState

if TYPE_CHECKING:
    from ..inputs.control import ControlSignal
    from ..inputs.inversion import PhotoRows


@dataclass
class Conditioning:
    """Text conditioning of the 2B CFG rows, [uncond, cond]."""

    prompt_embeds: torch.Tensor  # (2B, T, D)
    text_embeds: torch.Tensor  # (2B, D_pooled)
    time_ids: torch.Tensor  # (2B, 6)

    def doubled(self) -> "Conditioning":
        """The same conditioning for [vanilla rows, SDSA rows] in one forward."""
        return Conditioning(*(torch.cat([t, t]) for t in (self.prompt_embeds, self.text_embeds, self.time_ids)))

    def rows(self, rows: Sequence[int]) -> "Conditioning":
        """The conditioning of a sub-batch made of images `rows`."""
        b = self.prompt_embeds.shape[0] // 2
        index = list(rows) + [b + r for r in rows]
        return Conditioning(self.prompt_embeds[index], self.text_embeds[index], self.time_ids[index])


def encode_conditioning(pipe, prompts: Sequence[str], height: int, width: int, device) -> Conditioning:
    """Both text encoders and SDXL's size conditioning, exactly as diffusers builds them."""
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    if pipe.text_encoder_2 is None:
        projection_dim = int(pooled.shape[-1])
    else:
        projection_dim = pipe.text_encoder_2.config.projection_dim
    time_ids = pipe._get_add_time_ids(
        (height, width), (0, 0), (height, width), dtype=embeds.dtype, text_encoder_projection_dim=projection_dim
    )
    b = len(prompts)
    return Conditioning(
        prompt_embeds=torch.cat([negative, embeds]).to(device),
        text_embeds=torch.cat([negative_pooled, pooled]).to(device),
        time_ids=torch.cat([time_ids, time_ids]).to(device).repeat(b, 1),
    )


def nearest_step(timesteps: torch.Tensor, timestep: int) -> int:
    """Index of the step whose timestep is nearest `timestep` (the first, on a tie)."""
    return int((timesteps.float() - timestep).abs().argmin())


@contextmanager
def dift_hook(unet, state: RunState) -> Iterator[None]:
    """Capture the first `up` block's output (its upsampler included) at the DIFT step, with
    FreeU's backbone scaling of the next block applied first when the config says so (section 5)."""
    cfg = state.config
    scale = cfg.freeu_b2 if cfg.freeu and cfg.dift_freeu_scaling else None

    def hook(module, inputs, output):
        if state.capture_dift:
            features = output[state.half_rows(1)]
            if scale is not None:
                features = freeu_backbone_scaled(features, scale)
            state.dift = smooth_features(features, cfg.dift_kernel_size, cfg.dift_sigma)

    handle = unet.up_blocks[0].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def denoise_pass(
    pipe,
    scheduler,
    state: RunState,
    latents: torch.Tensor,
    cond: Conditioning,
    on_step: Callable[[int], None] | None = None,
    start: int = 0,
    snapshot_at: int | None = None,
    control: "ControlSignal | None" = None,
    photos: "PhotoRows | None" = None,
) -> tuple[torch.Tensor, PassSnapshot | None]:
    """One pass of the denoising loop, from `latents` at step `start` (the scheduler in the state
    it has there); returns the final latents and, if `snapshot_at` is given, the state of the
    pass just before that step. `control` adds ControlNet residuals; the rows of `photos` step
    with their inverted noise maps while the others keep the scheduler's step."""
    timesteps = scheduler.timesteps
    # The scheduler gets the timesteps as host numbers, read once per pass: its bookkeeping
    # (indexing its tables, comparing timesteps) then never waits for the device. The UNet
    # gets them on the device, as diffusers hands them.
    host_timesteps = timesteps.tolist()
    doubled = cond.doubled()
    guidance = state.config.guidance_scale
    extra = pipe.prepare_extra_step_kwargs(None, 0.0)
    snapshot = None
    for i, t in enumerate(timesteps):
        if i < start:
            continue
        if i == snapshot_at:
            snapshot = state.snapshot(i, latents, scheduler)
        state.begin_step(i)
        c = doubled if state.fused_vanilla else cond
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        residuals = control.residuals(i, len(timesteps), x, t, cond) if control is not None else {}
        if state.fused_vanilla:
            x = torch.cat([x, x])
            residuals = _doubled(residuals)
        noise = unet_forward(pipe, x, t, c, residuals)
        noise = noise[state.main_offset :]  # the vanilla forward's prediction is thrown away
        uncond, text = noise.chunk(2)
        noise = uncond + guidance * (text - uncond)
        stepped = scheduler.step(noise, host_timesteps[i], latents, **extra, return_dict=False)[0]
        latents = stepped if photos is None else photos.step(i, noise, latents, stepped)
        if on_step is not None:
            on_step(i)
    state.end_pass()
    return latents, snapshot


def _doubled(residuals: dict) -> dict:
    """ControlNet residuals for [vanilla rows, SDSA rows]: query mixing's vanilla forward sees the
    control as the SDSA forward does (see README, "Your own subject from photos, and poses with ControlNet")."""
    if not residuals:
        return residuals
    return {
        "down_block_additional_residuals": [torch.cat([d, d]) for d in residuals["down_block_additional_residuals"]],
        "mid_block_additional_residual": torch.cat([residuals["mid_block_additional_residual"]] * 2),
    }


def unet_forward(pipe, x: torch.Tensor, t, cond: Conditioning, residuals: dict) -> torch.Tensor:
    begin_forward(pipe.unet)
    return pipe.unet(
        x,
        t,
        encoder_hidden_states=cond.prompt_embeds,
        timestep_cond=None,
        added_cond_kwargs={"text_embeds": cond.text_embeds, "time_ids": cond.time_ids},
        return_dict=False,
        **residuals,
    )[0]


def guided_noise(pipe, scheduler, latents: torch.Tensor, t, step: int, cond: Conditioning, guidance: float,
                 control: "ControlSignal | None") -> torch.Tensor:
    """The plain model's CFG noise prediction for `latents` (no ConsiStory mechanism at work):
    what the inversion of a photo sees, the same prediction its regeneration sees with every
    mechanism off."""
    x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
    residuals = control.residuals(step, len(scheduler.timesteps), x, t, cond) if control is not None else {}
    uncond, text = unet_forward(pipe, x, t, cond, residuals).chunk(2)
    return uncond + guidance * (text - uncond)
