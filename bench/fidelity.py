"""How far a compact cache's new images lie from the exact cache's, relative to the method's effect.

    deviation_ratio = mean |compact - exact| / mean |exact - vanilla SDXL with FreeU|

on decoded pixels, same latents, summed over several prompt sets (2 anchors, dropout on), and
PSNR(compact, exact). Random weights lack the outlier channels of trained models, so the same is
measured with outliers planted: a few channels of every transformer block's first norm scaled
20-100x and the attention projections' input columns divided by the same factors. The model
computes the same function; only the activations a cache stores carry the outliers.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from consistory import ConsiStoryConfig, vanilla_config
from consistory.seeds import initial_latents

PROMPT_SETS = [  # (anchor prompts, new prompts), subject "dog"
    (["A photo of a dog in the park", "A photo of a dog on the beach"], ["A photo of a dog in the snow"]),
    (["A watercolor of a dog reading a book", "A watercolor of a dog in a cafe"], ["A watercolor of a dog on a boat"]),
    (["An oil painting of a dog wearing a hat", "An oil painting of a dog at the market"], ["An oil painting of a dog in the rain"]),
    (["A 3D render of a dog on a skateboard", "A 3D render of a dog in the mountains"], ["A 3D render of a dog in space"]),
    (["A pencil sketch of a dog by a lake", "A pencil sketch of a dog in a garden"], ["A pencil sketch of a dog at night"]),
]


def plant_outlier_channels(unet, per_block: int = 4, low: float = 20.0, high: float = 100.0, seed: int = 0) -> int:
    """Scale `per_block` channels of every transformer block's norm1 by 20-100x and divide the
    matching input columns of its attn1 projections: the same function, outlier activations."""
    g = torch.Generator().manual_seed(seed)
    planted = 0
    with torch.no_grad():
        for module in unet.modules():
            norm, attn = getattr(module, "norm1", None), getattr(module, "attn1", None)
            if norm is None or attn is None or getattr(norm, "weight", None) is None:
                continue
            channels = torch.randperm(norm.weight.shape[0], generator=g)[:per_block]
            factors = (low + (high - low) * torch.rand(per_block, generator=g)).to(norm.weight.device, norm.weight.dtype)
            norm.weight[channels] *= factors
            if norm.bias is not None:
                norm.bias[channels] *= factors
            for projection in (attn.to_q, attn.to_k, attn.to_v):
                projection.weight[:, channels] /= factors
            planted += 1
    return planted


def measure_deviation(pipe, config: ConsiStoryConfig, sets=PROMPT_SETS, subjects=("dog",)) -> dict:
    """Deviation ratio and PSNR of compact against exact over `sets`."""
    deviation = effect = 0.0
    psnrs, per_set = [], []
    size = (4, config.height // 8, config.width // 8)
    plain = vanilla_config(num_inference_steps=config.num_inference_steps, height=config.height,
                           width=config.width, freeu=True)
    for i, (anchors, new) in enumerate(sets):
        seed = 100 * i
        exact = pipe.create_anchors(anchors, list(subjects), seed=seed, config=config, output_type="latent").cache
        compact = pipe.create_anchors(anchors, list(subjects), seed=seed, config=config, output_type="latent",
                                      cache_codec="compact").cache
        seeds = [seed + len(anchors) + j for j in range(len(new))]
        latents = initial_latents(seeds, size, pipe.dtype, pipe.device)
        a = pipe.generate_from_anchors(exact, new, seeds=seeds, latents=latents, output_type="np").images
        b = pipe.generate_from_anchors(compact, new, seeds=seeds, latents=latents, output_type="np").images
        v = pipe.generate_story(new, list(subjects), config=plain, latents=latents, output_type="np").images
        d, e = float(np.abs(b - a).mean()), float(np.abs(a - v).mean())
        mse = float(((b - a) ** 2).mean())
        psnr = 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")
        deviation, effect = deviation + d, effect + e
        psnrs.append(psnr)
        per_set.append({"deviation": d, "method_effect": e, "ratio": d / e, "psnr_db": psnr})
        print(f"  set {i}: deviation {d:.3e}, method effect {e:.3e}, ratio {d / e:.4f}, PSNR {psnr:.1f} dB", flush=True)
    finite = [p for p in psnrs if math.isfinite(p)]
    return {
        "deviation_ratio": deviation / effect,
        "psnr_db": sum(finite) / len(finite) if finite else float("inf"),
        "prompt_sets": len(sets),
        "per_set": per_set,
    }
