"""The VAE round trip, both ways as diffusers does it: images to the latents the UNet works in
(photo anchors) and back (the story's images).

SDXL's VAE overflows in fp16, so an fp16 VAE whose config asks for it (`force_upcast`) runs in
fp32 and is cast back afterwards; the latents are normalized by the config's `latents_mean` /
`latents_std` where it has them, else only by its `scaling_factor`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def upcast(vae) -> Iterator[torch.dtype]:
    """The VAE in the dtype it must run in (yielded) for the duration of the block."""
    needed = vae.dtype == torch.float16 and vae.config.force_upcast
    if not needed:
        yield vae.dtype
        return
    _cast(vae, torch.float32)
    try:
        yield torch.float32
    finally:
        _cast(vae, torch.float16)


def _cast(module, dtype: torch.dtype) -> None:
    """Cast a diffusers model without its "keep in float32" warning, which it prints on every
    dtype cast even when no module asks for float32."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        module.to(dtype=dtype)
    finally:
        logger.setLevel(level)


def _mean_and_std(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The config's per-channel latent statistics as (1, C, 1, 1) tensors, or None."""
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    return tuple(torch.tensor(v).view(1, -1, 1, 1).to(like.device, like.dtype) for v in (mean, std))


def decode_latents(pipe, latents: torch.Tensor, output_type: str):
    """VAE decode and post-process as diffusers does, image by image to bound memory at large
    sizes."""
    vae = pipe.vae
    with upcast(vae):
        # What diffusers decodes in: the dtype of the layer that first reads the latents.
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        stats = _mean_and_std(vae, latents)
        if stats is not None:
            latents = latents * stats[1] / vae.config.scaling_factor + stats[0]
        else:
            latents = latents / vae.config.scaling_factor
        images = torch.cat([vae.decode(latents[i : i + 1], return_dict=False)[0] for i in range(latents.shape[0])])
    if getattr(pipe, "watermark", None) is not None:
        images = pipe.watermark.apply_watermark(images)
    return pipe.image_processor.postprocess(images, output_type=output_type)


def encode_images(vae, pixels: torch.Tensor, device) -> torch.Tensor:
    """Pixels (P, 3, H, W) in [-1, 1] -> the posterior means in the UNet's latent scale (float32,
    (P, C, h, w)); the inverse of `decode_latents`' normalization. Image by image, as decoding."""
    with upcast(vae) as dtype:
        means = [vae.encode(pixels[i : i + 1].to(device=device, dtype=dtype)).latent_dist.mean
                 for i in range(pixels.shape[0])]
    x0 = torch.cat(means).float()
    stats = _mean_and_std(vae, x0)
    if stats is not None:
        return (x0 - stats[0]) * vae.config.scaling_factor / stats[1]
    return x0 * vae.config.scaling_factor
