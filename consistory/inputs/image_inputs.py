"""Images that come with the prompts: photos of the subject as anchors, and ControlNet controls.

Both are per-row inputs of one batch. A photo anchor replaces its row's initial latent by the
photo's inverted x_T and steps with the photo's noise maps (`inversion`); a control image adds
ControlNet residuals to its row (`control`). This module checks them (their geometry before any
resize or model work) and prepares both for the denoising loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch

from .control import ControlSettings, ControlSignal, check_control_images
from ..method.denoise import Conditioning, guided_noise
from ..errors import InputError
from .inversion import PhotoRows, check_scheduler, invert, photo_latents

# A photo is resized to cover the image size and centre-cropped, so a strip of 1 x 16384 pixels
# would become ~96 x 1.5 million pixels (gigabytes) before the crop. Both limits pass every sane
# photo: panoramas stay within 8:1, and a photo within 4:1 covers a generation within 4:1 in the
# other orientation at 16 times its pixels. Controls are stretched to the image size instead,
# which the same limits keep from distorting them past use; one rule for both is what callers
# (the service's Ingress) check uploads with before any model work.
MAX_ASPECT_RATIO = 8
MAX_RESIZED_PIXELS_FACTOR = 16

# A photo row steps with eta = 1 along fixed noise maps, which amplifies the UNet's rounding
# 30-100x by the last step, and that rounding depends on the batch size (never on the other
# rows' values). A generation that holds photos therefore runs with its rows padded to a multiple
# of this, so a photo anchor computes the same whichever other rows (up to this many in all)
# share its batch.
PHOTO_BATCH_MULTIPLE = 4


def check_image_geometry(width: int, height: int, target_height: int, target_width: int, what: str = "image") -> None:
    """Refuse an image (photo anchor or control) of `width` x `height` pixels for a generation of
    `target_height` x `target_width` whose aspect ratio exceeds MAX_ASPECT_RATIO either way, or
    which, resized to cover the generation, would exceed MAX_RESIZED_PIXELS_FACTOR times its
    pixels. Pure: it needs only the sizes, so an upload can be checked before it is decoded."""
    if width < 1 or height < 1:
        raise InputError(f"{what} has no pixels ({width} x {height})")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InputError(f"{what} is {width} x {height} pixels; its aspect ratio must be at most "
                         f"{MAX_ASPECT_RATIO}:1 either way")
    resized_w, resized_h = cover_size(width, height, target_height, target_width)
    if resized_w * resized_h > MAX_RESIZED_PIXELS_FACTOR * target_height * target_width:
        raise InputError(
            f"{what} is {width} x {height} pixels; resized to cover the {target_width} x {target_height} image it "
            f"would be {resized_w} x {resized_h}, over {MAX_RESIZED_PIXELS_FACTOR} times the image's pixels: "
            "crop it closer to the image's aspect ratio"
        )


def cover_size(width: int, height: int, target_height: int, target_width: int) -> tuple[int, int]:
    """(width, height) a `width` x `height` image is resized to before the centre crop to the
    target (diffusers' resize_mode="crop", its integer arithmetic)."""
    if target_width * height > width * target_height:  # the image is narrower than the target
        return target_width, height * target_width // width
    return width * target_height // height, target_height


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
        size: tuple[int, int] | None = None,
    ) -> "ImageInputs":
        """`size`: the generation's (height, width), which the images' geometry is checked against."""
        photos = _check_photos(images, n_anchors)
        start, end = _pair(control_guidance)
        settings = ControlSettings(controlnet_conditioning_scale, start, end)
        inputs = cls(photos, check_control_images(control_images, n_prompts), settings)
        if size is not None:
            for what, image in inputs._images():
                check_image_geometry(image.width, image.height, *size, what=what)
        return inputs

    def _images(self) -> Iterator[tuple[str, Any]]:
        for kind, images in (("anchor image", self.photos), ("control image", self.controls)):
            for i, image in enumerate(images or []):
                if image is not None:
                    yield f"{kind} {i}", image

    def batch_rows(self, n_rows: int) -> int:
        """How many rows a batch of `n_rows` images runs with: a multiple of PHOTO_BATCH_MULTIPLE
        when it holds photos, else `n_rows`."""
        if self.photos is None:
            return n_rows
        return -(-n_rows // PHOTO_BATCH_MULTIPLE) * PHOTO_BATCH_MULTIPLE

    def padded(self, n_rows: int) -> "ImageInputs":
        """The inputs of the batch with throwaway rows up to `n_rows`: no control for them."""
        if self.controls is None or len(self.controls) >= n_rows:
            return self
        return replace(self, controls=self.controls + [None] * (n_rows - len(self.controls)))

    def control_signal(self, controlnet, height: int, width: int, vae_scale_factor: int, device) -> ControlSignal | None:
        # With photos in the batch, ControlNet runs on every row: its rounding too depends on
        # how many rows it runs on, and a photo row amplifies it.
        return ControlSignal.prepare(controlnet, self.controls, height, width, vae_scale_factor, device, self.control,
                                     every_row=self.photos is not None)

    def invert_photos(self, pipe, scheduler, cond: Conditioning, latents: torch.Tensor, seeds: Sequence[int], config,
                      control: ControlSignal | None, device) -> PhotoRows | None:
        """Edit-friendly DDPM inversion of the photo anchors, with the noise predictions their
        rows see with every mechanism off (same prompts, guidance, FreeU setting and control).

        The predictions are made in the batch the rows are regenerated in (`cond` and `control`
        of every row, `latents` (B, C, h, w) the batch's initial latents filling the other rows),
        each photo at its own row: the UNet's rounding depends on the batch size, not on the other
        rows' values, so with every mechanism off a photo row's regeneration sees the very
        predictions its maps were made from, in any batch."""
        if self.photos is None:
            return None
        check_scheduler(scheduler)
        rows = [i for i, photo in enumerate(self.photos) if photo is not None]
        x0 = photo_latents(pipe, [self.photos[i] for i in rows], config.height, config.width, device)
        dtype = pipe.unet.dtype

        def predict(x_t: torch.Tensor, t, step: int) -> torch.Tensor:
            batch = latents.to(dtype).clone()
            batch[rows] = x_t.to(dtype)
            return guided_noise(pipe, scheduler, batch, t, step, cond, config.guidance_scale, control)[rows]

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
