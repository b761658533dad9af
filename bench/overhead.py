"""Cost of ConsiStory over vanilla SDXL: same prompts, seeds, steps and batch.

    python bench/overhead.py --preset small --batch 4 --json bench/results/overhead-small.json
    python bench/overhead.py --preset full --batch 4          # on a GPU: the real SDXL compute

Vanilla is diffusers' own StableDiffusionXLPipeline call on the same components and latents.
Both sides decode with the VAE (what a user gets); `ratio_denoise` compares the denoising alone
(output_type="latent"). Counting UNet forwards of the batch (a forward fused with query mixing's
vanilla rows counts twice): pass 1 runs S + S//10, pass 2 resumes at step S//10 and runs
S - S//10 + 1, against S for vanilla. `forward_ratio` is that count, the floor for
`ratio_denoise`: 2.05 at 20 steps, 2.02 at 50.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import PROMPTS, add_common_args, build_pipeline, device_name, report, resolve, timed

from consistory import ConsiStoryConfig
from consistory.seeds import consecutive_seeds, initial_latents


def unet_forwards(config: ConsiStoryConfig) -> int:
    """Batch forwards of a story: each pass's steps, plus one per step fused with query mixing."""
    s = config.num_inference_steps
    mixed = [i for i in range(s) if config.query_mix_strength(i) is not None]
    count = s + len(mixed)
    if config.two_passes:
        start = config.injection_steps().start
        count += (s - start) + sum(1 for i in mixed if i >= start)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch", type=int, default=4, help="images per story (2 anchors + the rest)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side (after one warm-up)")
    args = resolve(parser.parse_args())
    pipe = build_pipeline(args)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    config = ConsiStoryConfig(num_inference_steps=args.steps, height=args.height, width=args.width)
    grid = (args.height // 8, args.width // 8)
    latents = initial_latents(consecutive_seeds(0, args.batch), (4, *grid), pipe.dtype, pipe.device)

    def vanilla(output_type):
        return lambda: pipe.sdxl(
            prompts, num_inference_steps=args.steps, height=args.height, width=args.width,
            guidance_scale=config.guidance_scale, latents=latents.clone(), output_type=output_type,
        )

    def consistory(output_type):
        return lambda: pipe.generate_story(prompts, ["dog"], seed=0, config=config, latents=latents, output_type=output_type)

    def seconds(fn):
        fn()  # warm-up: kernels, allocator, lazy initialisation
        return statistics.median(timed(fn, args.device)[0] for _ in range(args.repeats))

    with torch.inference_mode():
        van = seconds(vanilla("np"))
        ours = seconds(consistory("np"))
        van_latent = seconds(vanilla("latent"))
        ours_latent = seconds(consistory("latent"))
    s = args.steps
    report(
        {
            "preset": args.preset,
            "device": device_name(args.device),
            "dtype": str(args.dtype).removeprefix("torch."),
            "height": args.height,
            "width": args.width,
            "steps": s,
            "batch": args.batch,
            "vanilla_s_per_image": van / args.batch,
            "consistory_s_per_image": ours / args.batch,
            "ratio": ours / van,
            "vanilla_denoise_s_per_image": van_latent / args.batch,
            "consistory_denoise_s_per_image": ours_latent / args.batch,
            "ratio_denoise": ours_latent / van_latent,
            "forward_ratio": unet_forwards(config) / s,
            "torch": torch.__version__,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
