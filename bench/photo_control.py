"""Cost of a photo anchor (edit-friendly DDPM inversion) and of ControlNet per image.

    python bench/photo_control.py --preset small --json bench/results/photo-control-small.json

- Photo anchor: `create_anchors` of two anchor prompts, both generated, against the same call with
  the first anchor from a photo. The difference is the inversion: the photo's VAE encoding and S
  noise predictions of its row (CFG), computed before the anchor batch runs; `inversion_s` is the
  library's own timing of that part.
- ControlNet: one new image from the cache (`generate_from_anchors`), without and with a control
  image for a ControlNet built from the preset's UNet (SDXL's ControlNet topology: a copy of the
  UNet's encoder and middle block), so the overhead is the ControlNet forward per UNet forward.
Runs alternate between the two sides of each comparison; figures are medians.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from common import PROMPTS, add_common_args, build_pipeline, device_name, report, resolve, timed
from PIL import Image, ImageDraw

from consistory import ConsiStoryConfig
from consistory.presets.sdxl import build_preset_controlnet


def photo(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


def pose(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    cx, u = width // 2, height // 16
    draw.ellipse((cx - u, u, cx + u, 3 * u), outline=(255, 0, 0), width=max(1, u // 3))
    for a, b in [((cx, 3 * u), (cx, 9 * u)), ((cx - 4 * u, 5 * u), (cx + 4 * u, 5 * u)),
                 ((cx, 9 * u), (cx - 3 * u, 15 * u)), ((cx, 9 * u), (cx + 3 * u, 15 * u))]:
        draw.line((a, b), fill=(0, 255, 0), width=max(1, u // 2))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--repeats", type=int, default=2)
    args = resolve(parser.parse_args())
    pipe = build_pipeline(args)
    pipe.controlnet = build_preset_controlnet(pipe.sdxl.unet)
    config = ConsiStoryConfig(num_inference_steps=args.steps, height=args.height, width=args.width)
    anchors, new = PROMPTS[:2], PROMPTS[2:3]
    image, control = photo(args.width, args.height), pose(args.width, args.height)

    generated, from_photo, inversion, plain, controlled = [], [], [], [], []
    cache = None
    for _ in range(args.repeats):
        s, out = timed(lambda: pipe.create_anchors(anchors, ["dog"], config=config, output_type="latent"), args.device)
        generated.append(s)
        cache = out.cache
        s, out = timed(lambda: pipe.create_anchors(anchors, ["dog"], config=config, output_type="latent",
                                                   images=[image, None]), args.device)
        from_photo.append(s)
        inversion.append(out.timings["inversion_s"])
        s, _ = timed(lambda: pipe.generate_from_anchors(cache, new, output_type="latent"), args.device)
        plain.append(s)
        s, _ = timed(lambda: pipe.generate_from_anchors(cache, new, output_type="latent", control_images=[control]),
                     args.device)
        controlled.append(s)

    med = statistics.median
    figures = {
        "preset": args.preset,
        "device": device_name(args.device),
        "dtype": str(args.dtype).removeprefix("torch."),
        "height": args.height,
        "width": args.width,
        "steps": args.steps,
        "repeats": args.repeats,
        "anchors_generated_s": med(generated),
        "anchors_one_photo_s": med(from_photo),
        "inversion_s": med(inversion),
        "photo_anchor_extra_ratio": med(from_photo) / med(generated) - 1,
        "new_image_s": med(plain),
        "new_image_controlnet_s": med(controlled),
        "controlnet_overhead_ratio": med(controlled) / med(plain) - 1,
        "controlnet_params_m": sum(p.numel() for p in pipe.controlnet.parameters()) / 1e6,
        "unet_params_m": sum(p.numel() for p in pipe.sdxl.unet.parameters()) / 1e6,
    }
    report(figures, args.json)


if __name__ == "__main__":
    main()
