"""Images that come with the prompts: photos of the subject as anchors, and ControlNet controls.

Both are per-row inputs of one batch. A photo anchor replaces its row's initial latent by the
photo's inverted x_T and steps with the photo's noise maps (`inversion`); a control image adds
ControlNet residuals to its row (`control`). This module checks them and prepares both for the
denoising loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .control import ControlSettings, ControlSignal, check_control_images
from .denoise import Conditioning, guided_noise
from .errors import InputError
from .inversion import PhotoRows, check_scheduler, invert, photo_latents


@dataclass
class ImageInputs:
    """Per-row images of one generation: `photos` for the leading anchor rows (None for a
    generated anchor), `controls` for every row (None for no control)."""

    photos: list[Any] | None = None
    controls: list[Any] | None = None
    control: ControlSettings = field(default_factory=ControlSettings)

    @classmethod
    def checked(
        cls,
        n_prompts: int,
        n_anchors: int,
        images: Sequence[Any] | None = None,
        control_images: Sequence[Any] | None = None,
        controlnet_conditioning_scale: float = 1.0,
        control_guidance: tuple[float, float] = (0.0, 1.0),
    ) -> "ImageInputs":
        photos = _check_photos(images, n_anchors)
        start, end = _pair(control_guidance)
        settings = ControlSettings(controlnet_conditioning_scale, start, end)
        return cls(photos, check_control_images(control_images, n_prompts), settings)

    def control_signal(self, controlnet, height: int, width: int, vae_scale_factor: int, device) -> ControlSignal | None:
        return ControlSignal.prepare(controlnet, self.controls, height, width, vae_scale_factor, device, self.control)

    def invert_photos(self, pipe, scheduler, cond: Conditioning, seeds: Sequence[int], config,
                      control: ControlSignal | None, device) -> PhotoRows | None:
        """Edit-friendly DDPM inversion of the photo anchors, with the noise predictions their
        rows see with every mechanism off (same prompts, guidance, FreeU setting and control)."""
        if self.photos is None:
            return None
        check_scheduler(scheduler)
        rows = [i for i, photo in enumerate(self.photos) if photo is not None]
        x0 = photo_latents(pipe, [self.photos[i] for i in rows], config.height, config.width, device)
        row_cond = cond.rows(rows)
        row_control = control.subset(rows) if control is not None else None
        dtype = pipe.unet.dtype

        def predict(x_t: torch.Tensor, t, step: int) -> torch.Tensor:
            return guided_noise(pipe, scheduler, x_t.to(dtype), t, step, row_cond, config.guidance_scale, row_control)

        return invert(x0, [seeds[i] for i in rows], rows, scheduler, predict, dtype)


def _check_photos(images: Sequence[Any] | None, n_anchors: int) -> list[Any] | None:
    if images is None:
        return None
    from PIL import Image

    if isinstance(images, Image.Image):
        raise InputError("images must be a list with one entry per anchor prompt, not a single image: use [image]")
    images = list(images)
    if len(images) != n_anchors:
        raise InputError(
            f"got {len(images)} anchor images for {n_anchors} anchor prompt(s); give one per anchor prompt "
            "(None for an anchor generated from its prompt)"
        )
    for i, image in enumerate(images):
        if image is not None and not isinstance(image, Image.Image):
            raise InputError(f"anchor image {i} must be a PIL image or None (got {type(image).__name__})")
    return images if any(image is not None for image in images) else None


def _pair(values) -> tuple[float, float]:
    try:
        start, end = values
    except (TypeError, ValueError):
        raise InputError(f"control_guidance must be (start, end) (got {values!r})") from None
    return start, end
