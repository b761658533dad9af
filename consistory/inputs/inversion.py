"""Photo anchors: edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov, Michaeli, CVPR 2024).

A photo becomes an anchor row of the batch. Its latent x_0 (the VAE posterior's mean, scaled as
the VAE's config says) is noised to every timestep of the story *independently*,
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_t, and for each step the noise map

    z_t = (x_prev - mu_t(x_t, eps_theta(x_t))) / sigma_t

is kept, where mu_t and sigma_t are the DDPM-style step (eta = 1) from t to the next timestep of
the schedule. Stepping the row with its own z_t from x_T then lands on x_0 again (up to float
error): the photo regenerates itself while it sits in the batch as an anchor, and the other images
attend to it through SDSA and feature injection. Nothing is trained and no encoder is used.

With ConsiStory on, the row's trajectory is perturbed by SDSA (the noise predictions differ from
the inversion's), as in the paper; the maps are still applied step by step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import InputError
from ..method.vae import encode_images

# (latents (2P, C, h, w) already scaled for the model, timestep, step index) -> guided noise (P, C, h, w)
NoisePredictor = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def check_scheduler(scheduler) -> None:
    """Inversion works in the variance-preserving parametrization x_t = sqrt(abar) x_0 + ...;
    samplers that scale the latents (Euler and the like, init_noise_sigma > 1) are refused."""
    if getattr(scheduler, "alphas_cumprod", None) is None or float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        raise InputError(
            f"photo anchors need a variance-preserving sampler such as DDIM (the default); "
            f"the pipeline's scheduler is {type(scheduler).__name__}"
        )


def schedule_alphas(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """(abar_t, abar_prev) of every step of the scheduler's current timesteps, float64.

    abar_prev is the next timestep's; after the last step it is the scheduler's final value
    (DDIM's `final_alpha_cumprod`: abar at timestep 0 for SDXL's config, 1 where none is set)."""
    alphas = scheduler.alphas_cumprod.to(torch.float64).cpu()
    timesteps = scheduler.timesteps.long().cpu()
    final = getattr(scheduler, "final_alpha_cumprod", torch.tensor(1.0))
    abar = alphas[timesteps]
    abar_prev = torch.cat([alphas[timesteps[1:]], torch.as_tensor(final, dtype=torch.float64).reshape(1)])
    return abar, abar_prev


def ddpm_mean_and_std(x_t: torch.Tensor, noise: torch.Tensor, abar: float, abar_prev: float):
    """The DDPM posterior step with eta = 1 (DDIM's formula at eta = 1): mean and std of x_prev."""
    variance = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    sigma = max(variance, 0.0) ** 0.5
    x0_pred = (x_t - (1 - abar) ** 0.5 * noise) / abar**0.5
    direction = max(1 - abar_prev - variance, 0.0) ** 0.5 * noise
    return abar_prev**0.5 * x0_pred + direction, sigma


@dataclass
class PhotoRows:
    """The photo anchors of a batch: their rows, and the noise map of every step.

    The step arithmetic is done in float64 and rounded to the latents' dtype once, as in the
    inversion: from the same latents and noise prediction, the step then lands on the very
    x_prev the inversion sampled, so rounding does not build up along the trajectory."""

    rows: list[int]  # batch rows holding a photo (anchors are the leading rows)
    x_T: torch.Tensor  # (P, C, h, w) the rows' initial latents, in the latents' dtype
    noise_maps: torch.Tensor  # (S, P, C, h, w) float64
    abar: torch.Tensor  # (S,) float64
    abar_prev: torch.Tensor  # (S,)

    def step(self, step: int, noise: torch.Tensor, latents: torch.Tensor, stepped: torch.Tensor) -> torch.Tensor:
        """`stepped` (the sampler's step of every row) with the photo rows replaced by their
        DDPM step from `latents` with this step's noise map."""
        rows = self.rows
        x_prev = _ddpm_step(latents[rows].double(), noise[rows].double(), self.noise_maps[step].to(latents.device),
                            float(self.abar[step]), float(self.abar_prev[step]))
        out = stepped.clone()
        out[rows] = x_prev.to(stepped.dtype)
        return out


def _ddpm_step(x_t, noise, z, abar: float, abar_prev: float) -> torch.Tensor:
    mean, sigma = ddpm_mean_and_std(x_t, noise, abar, abar_prev)
    # Where the step has no noise (abar_prev = 1), the map holds the residual itself, so the
    # last step still lands exactly on the photo.
    return mean + (sigma if sigma > 0 else 1.0) * z


def invert(
    x0: torch.Tensor,
    seeds: Sequence[int],
    rows: list[int],
    scheduler,
    predict_noise: NoisePredictor,
    dtype: torch.dtype = torch.float32,
) -> PhotoRows:
    """Edit-friendly DDPM inversion of the photo latents `x0` (P, C, h, w) on the scheduler's
    current timesteps, for latents held in `dtype`. Row p's noises eps_t come from a generator
    seeded with `seeds[p]`; its first draw is the story's initial noise for that seed."""
    check_scheduler(scheduler)
    abar, abar_prev = schedule_alphas(scheduler)
    timesteps = scheduler.timesteps
    # contiguous: the VAE can hand back a channels-last layout, and convolutions on another
    # layout round differently from the regeneration's.
    x0 = x0.to(torch.float64).contiguous()
    steps = len(timesteps)
    eps = torch.stack([
        torch.randn((steps, *x0.shape[1:]), generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)
        for seed in seeds
    ], dim=1).to(x0.device, torch.float64)  # (S, P, C, h, w)
    shape = (-1, 1, 1, 1, 1)
    # Every x_t independently from q(x_t | x_0), held as the sampler holds latents (rounded once).
    x_t = (abar.sqrt().view(shape).to(x0.device) * x0 + (1 - abar).sqrt().view(shape).to(x0.device) * eps).to(dtype)
    maps = torch.empty(x_t.shape, dtype=torch.float64, device=x0.device)
    for i, t in enumerate(timesteps):
        noise = predict_noise(x_t[i], t, i).double()
        target = x_t[i + 1].double() if i + 1 < steps else x0
        mean, sigma = ddpm_mean_and_std(x_t[i].double(), noise, float(abar[i]), float(abar_prev[i]))
        maps[i] = (target - mean) / (sigma if sigma > 0 else 1.0)
    return PhotoRows(rows=list(rows), x_T=x_t[0], noise_maps=maps, abar=abar, abar_prev=abar_prev)


def photo_latents(pipe, images: Sequence, height: int, width: int, device) -> torch.Tensor:
    """x_0 of each photo: resized to cover (height, width) and centre-cropped, encoded by the VAE,
    the posterior's mean in the latent scale the UNet works in (float32, (P, C, h, w))."""
    from PIL import Image

    for image in images:
        if not isinstance(image, Image.Image):
            raise InputError(f"anchor images must be PIL images (got {type(image).__name__})")
    pixels = pipe.image_processor.preprocess([im.convert("RGB") for im in images], height=height, width=width,
                                             resize_mode="crop")
    return encode_images(pipe.vae, pixels, device)
