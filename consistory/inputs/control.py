"""ControlNet conditioning per image: a pose, depth or edge map for some prompts, none for others.

The residuals are computed as diffusers' `StableDiffusionXLControlNetPipeline` computes them (the
same preprocessing, conditioning scale, guidance window and guess mode), from the rows that have a
control image, and are zero for the rows that have none; ControlNet's output of one row depends
only on that row, so an image's control changes that image alone. SDSA and feature injection live
in the UNet's attention processors and are untouched by the residuals (docs/method.md 10b).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import InputError


@dataclass(frozen=True)
class ControlSettings:
    """As diffusers names them: residuals are scaled by `conditioning_scale` at the steps whose
    fraction of the schedule lies within [guidance_start, guidance_end]."""

    conditioning_scale: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0

    def __post_init__(self) -> None:
        for name in ("conditioning_scale", "guidance_start", "guidance_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise InputError(f"controlnet {name} must be a number (got {value!r})")
        if not 0.0 <= self.guidance_start < self.guidance_end <= 1.0:
            raise InputError(
                "control_guidance_start and control_guidance_end must satisfy 0 <= start < end <= 1 "
                f"(got {self.guidance_start}, {self.guidance_end})"
            )

    def scale_at(self, step: int, steps: int) -> float:
        outside = step / steps < self.guidance_start or (step + 1) / steps > self.guidance_end
        return 0.0 if outside else float(self.conditioning_scale)


def check_control_images(control_images: Sequence[Any] | None, n_prompts: int) -> list[Any] | None:
    """One entry per prompt, each a PIL image or None; None (or all None) means no control."""
    if control_images is None:
        return None
    from PIL import Image

    control_images = list(control_images)
    if len(control_images) != n_prompts:
        raise InputError(
            f"got {len(control_images)} control images for {n_prompts} prompts; give one per prompt (None for no control)"
        )
    for i, image in enumerate(control_images):
        if image is not None and not isinstance(image, Image.Image):
            raise InputError(f"control image {i} must be a PIL image or None (got {type(image).__name__})")
    return control_images if any(image is not None for image in control_images) else None


class ControlSignal:
    """The control images of one batch on the device, and the residuals they add at each step."""

    def __init__(self, controlnet, images: torch.Tensor, rows: list[int], n_images: int, settings: ControlSettings,
                 every_row: bool = False):
        self.controlnet = controlnet
        self.images = images  # (K, 3, H, W) in [0, 1], the rows' control images
        self.rows = rows
        self.n_images = n_images
        self.settings = settings
        # As diffusers: a ControlNet trained with global pooling runs in guess mode, on the
        # conditional rows only.
        self.guess_mode = bool(getattr(controlnet.config, "global_pool_conditions", False))
        # The images' rows ControlNet runs on: those with a control image, or (`every_row`) all
        # of them, a blank image standing in for the rows without one (their residuals are
        # dropped), so that its batch size is the UNet's.
        run_rows, run_images = rows, images
        if every_row:
            run_rows = list(range(n_images))
            run_images = images.new_zeros((n_images, *images.shape[1:]))
            run_images[rows] = images
        # The CFG rows [uncond, cond] (2B of them) ControlNet runs on, their images, and the
        # CFG rows whose residuals are kept with their positions in ControlNet's batch: the same
        # at every step.
        self._cfg_rows = self._cfg(run_rows)
        self._cfg_images = run_images if self.guess_mode else torch.cat([run_images, run_images])
        self._kept_rows = self._cfg(rows)
        self._kept = [self._cfg_rows.index(r) for r in self._kept_rows]

    def _cfg(self, rows: list[int]) -> list[int]:
        cond_rows = [self.n_images + r for r in rows]
        return cond_rows if self.guess_mode else rows + cond_rows

    @classmethod
    def prepare(cls, controlnet, control_images: list[Any] | None, height: int, width: int, vae_scale_factor: int,
                device, settings: ControlSettings, every_row: bool = False) -> "ControlSignal | None":
        if control_images is None:
            return None
        if controlnet is None:
            raise InputError(
                "control images need a ControlNet: load the pipeline with controlnet=ControlNetModel (or "
                "wrap a StableDiffusionXLControlNetPipeline with from_sdxl)"
            )
        from diffusers.image_processor import VaeImageProcessor

        processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_convert_rgb=True, do_normalize=False)
        rows = [i for i, image in enumerate(control_images) if image is not None]
        pixels = processor.preprocess([control_images[i] for i in rows], height=height, width=width)
        images = pixels.to(torch.float32).to(device=device, dtype=controlnet.dtype)
        return cls(controlnet, images, rows, len(control_images), settings, every_row)

    def residuals(self, step: int, steps: int, x: torch.Tensor, t, cond) -> dict[str, Any]:
        """UNet keyword arguments for the CFG rows [uncond, cond] `x` (2B, C, h, w) at `step`;
        empty where the residuals would all be zero."""
        scale = self.settings.scale_at(step, steps)
        if scale == 0.0:
            return {}
        b, rows = self.n_images, self._cfg_rows
        down, mid = self.controlnet(
            x[rows],
            t,
            encoder_hidden_states=cond.prompt_embeds[rows],
            controlnet_cond=self._cfg_images,
            conditioning_scale=scale,
            guess_mode=self.guess_mode,
            added_cond_kwargs={"text_embeds": cond.text_embeds[rows], "time_ids": cond.time_ids[rows]},
            return_dict=False,
        )

        def all_rows(residual: torch.Tensor) -> torch.Tensor:
            out = residual.new_zeros((2 * b, *residual.shape[1:]))
            out[self._kept_rows] = residual[self._kept]
            return out

        return {
            "down_block_additional_residuals": [all_rows(d) for d in down],
            "mid_block_additional_residual": all_rows(mid),
        }


def check_controlnet(controlnet) -> None:
    if controlnet is not None and hasattr(controlnet, "nets"):
        raise InputError("several ControlNets at once (MultiControlNetModel) are not supported; give one ControlNetModel")
