"""Anchor cache figures: bytes per subject, save/load seconds, and the cost of one new image
from the cache relative to one vanilla SDXL image.

    python bench/anchor_cache.py --preset small --json bench/results/anchor-cache-small.json
    python bench/anchor_cache.py --preset full               # on a GPU

The bytes of a cache at 1024 x 1024 on the full SDXL architecture are also counted exactly from
the layer shapes (the UNet is built on the meta device: no weights, no generation) for a range of
mean subject-mask fractions, and the same count is checked against the measured cache of this run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from common import PROMPTS, add_common_args, build_pipeline, device_name, report, resolve, timed

from consistory import AnchorCache, ConsiStoryConfig
from consistory.cache_size import estimate_cache_bytes
from consistory.seeds import initial_latents

FULL_FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def full_sdxl_unet_on_meta():
    from diffusers import UNet2DConditionModel

    from consistory.presets import unet_config

    with torch.device("meta"):
        return UNet2DConditionModel(**unet_config("full"))


def measured_mask_fraction(cache: AnchorCache) -> float:
    fine = cache.masks["fine"]
    return float(fine.float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--repeats", type=int, default=2)
    args = resolve(parser.parse_args())
    pipe = build_pipeline(args)
    config = ConsiStoryConfig(num_inference_steps=args.steps, height=args.height, width=args.width)
    anchors, new = PROMPTS[:2], PROMPTS[2:3]

    with torch.inference_mode():
        made = pipe.create_anchors(anchors, ["dog"], seed=0, config=config, output_type="np")
        cache = made.cache
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "subject.cache"
            save_s = statistics.median(timed(lambda: cache.save(path), "cpu")[0] for _ in range(args.repeats))
            load_s = statistics.median(
                timed(lambda: AnchorCache.load(path, device=args.device), args.device)[0] for _ in range(args.repeats)
            )
            file_bytes = path.stat().st_size
        latent = initial_latents([2], (4, args.height // 8, args.width // 8), pipe.dtype, pipe.device)

        def vanilla():
            return pipe.sdxl(new, num_inference_steps=args.steps, height=args.height, width=args.width,
                             guidance_scale=config.guidance_scale, latents=latent.clone(), output_type="np")

        def from_cache():
            return pipe.generate_from_anchors(cache, new, seeds=[2], latents=latent, output_type="np")

        vanilla(), from_cache()  # warm-up
        van_s = statistics.median(timed(vanilla, args.device)[0] for _ in range(args.repeats))
        new_s = statistics.median(timed(from_cache, args.device)[0] for _ in range(args.repeats))

    fraction = measured_mask_fraction(cache)
    predicted = estimate_cache_bytes(pipe.sdxl.unet, config, fraction, torch.finfo(pipe.dtype).bits // 8)
    full_config = ConsiStoryConfig()  # 1024 x 1024, 50 steps, 2 anchors
    full_unet = full_sdxl_unet_on_meta()
    figures = {
        "preset": args.preset,
        "device": device_name(args.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "height": args.height,
        "width": args.width,
        "steps": args.steps,
        "n_anchors": cache.n_anchors,
        "cache_bytes": cache.nbytes,
        "cache_file_bytes": file_bytes,
        "cache_bytes_per_anchor": cache.nbytes // cache.n_anchors,
        "mean_subject_mask_fraction": fraction,
        "predicted_cache_bytes_at_that_fraction": predicted["total"],
        "save_s": save_s,
        "load_s": load_s,
        "vanilla_s_per_image": van_s,
        "new_image_s": new_s,
        "new_image_cost_ratio": new_s / van_s,
    }
    for f in FULL_FRACTIONS:
        sizes = estimate_cache_bytes(full_unet, full_config, f, dtype_bytes=2)
        figures[f"full_1024_fp16_cache_bytes_mask_{f:g}"] = sizes["total"]
    report(figures, args.json)


if __name__ == "__main__":
    main()
