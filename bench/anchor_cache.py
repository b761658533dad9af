"""Anchor cache figures per codec: bytes per subject, save/load seconds, the cost of one new image
from the cache relative to one vanilla SDXL image, the compact codec's fidelity, and the hand-off
of a full-size cache through Ray's object store.

    python bench/anchor_cache.py --preset small --json bench/results/anchor-cache-small.json
    python bench/anchor_cache.py --preset full               # on a GPU

Bytes at 1024 x 1024 on the full SDXL architecture are counted from the layer shapes (the UNet is
built on the meta device: no weights, no generation) at mean subject-mask fractions 0.1 / 0.25 /
0.5 / 1.0 for each layout: format version 1 (keys and values, both passes in full), exact and
compact. The same count, fed the masks of this run's caches, is set against their real bytes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from common import PROMPTS, add_common_args, build_pipeline, device_name, report, resolve, timed
from fidelity import PROMPT_SETS, measure_deviation, plant_outlier_channels

from consistory import AnchorCache, ConsiStoryConfig
from consistory.cache.size import MaskStats, count_cache_bytes
from consistory.seeds import initial_latents

FULL_FRACTIONS = ("0.1", "0.25", "0.5", "1.0")


def full_sdxl_unet_on_meta():
    from diffusers import UNet2DConditionModel

    from consistory.presets.sdxl import unet_config

    with torch.device("meta"):
        return UNet2DConditionModel(**unet_config("full"))


def full_counted_gb(layout: str) -> dict[str, float]:
    unet, config = full_sdxl_unet_on_meta(), ConsiStoryConfig()  # 1024 x 1024, 50 steps, 2 anchors
    return {
        f: count_cache_bytes(unet, config, MaskStats.assumed(float(f), config), layout, dtype_bytes=2)["total"] / 1e9
        for f in FULL_FRACTIONS
    }


def codec_figures(pipe, args, config, codec: str, vanilla) -> dict:
    anchors, new = PROMPTS[:2], PROMPTS[2:3]
    made = pipe.create_anchors(anchors, ["dog"], seed=0, config=config, output_type="latent", cache_codec=codec)
    cache = made.cache
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "subject.cache"
        save_s = statistics.median(timed(lambda: cache.save(path), "cpu")[0] for _ in range(args.repeats))

        def load_and_read():  # map the file and read every tensor once, as a replay does
            loaded = AnchorCache.load(path, device=args.device)
            return sum(int(t.reshape(-1)[:1].numel()) for t in loaded.tensors.values())

        load_s = statistics.median(timed(load_and_read, args.device)[0] for _ in range(args.repeats))
        file_bytes = path.stat().st_size
    latent = initial_latents([2], (4, args.height // 8, args.width // 8), pipe.dtype, pipe.device)

    def from_cache():
        return pipe.generate_from_anchors(cache, new, seeds=[2], latents=latent, output_type="np")

    from_cache()  # warm-up
    # Interleaved, so that both sides see the same machine: a shared CPU's speed drifts.
    vanilla_runs, new_runs = [], []
    for _ in range(args.repeats):
        vanilla_runs.append(timed(vanilla, args.device)[0])
        new_runs.append(timed(from_cache, args.device)[0])
    vanilla_s, new_s = statistics.median(vanilla_runs), statistics.median(new_runs)
    masks = MaskStats.of_cache(cache, pipe.sdxl.unet)
    counted = count_cache_bytes(pipe.sdxl.unet, config, masks, codec, torch.finfo(pipe.dtype).bits // 8)["total"]
    return {
        "bytes_per_subject": cache.nbytes,
        "file_bytes": file_bytes,
        "counted_bytes_with_these_masks": counted,
        "full_counted_gb": full_counted_gb(codec),
        "save_s": save_s,
        "load_s": load_s,
        "vanilla_s_per_image": vanilla_s,
        "new_image_s": new_s,
        "new_image_cost_ratio": new_s / vanilla_s,
        "anchors_s": made.timings["total_s"],
    }


def handoff_in_subprocess(attempts: int = 2) -> dict:
    """bench/handoff.py in a fresh process with its own Ray instance (a Ray started here, next to
    a loaded pipeline, competes with it for memory and time)."""
    import json
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "handoff.json"
        for attempt in range(1, attempts + 1):
            done = subprocess.run([sys.executable, str(here / "handoff.py"), "--json", str(out)],
                                  capture_output=True, text=True)
            if done.returncode == 0 and out.is_file():
                return json.loads(out.read_text())
            print(f"hand-off attempt {attempt} failed:\n{done.stderr[-2000:]}", flush=True)
    raise RuntimeError("the hand-off benchmark failed; see above")


def write(figures: dict, path: Path | None) -> None:
    """Write what is measured so far, so that a later part failing loses nothing."""
    if path is not None:
        import json

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sets", type=int, default=len(PROMPT_SETS), help="prompt sets for the fidelity figures")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--skip-handoff", action="store_true")
    args = resolve(parser.parse_args())
    figures: dict = {"preset": args.preset}
    if not args.skip_handoff:  # first: a fresh machine state, before the pipeline takes memory
        figures["handoff"] = handoff_in_subprocess()
        figures["handoff_s"] = figures["handoff"]["handoff_s"]
        figures["handoff_rss_growth_fraction"] = figures["handoff"]["handoff_rss_growth_fraction"]
        print(f"hand-off: {figures['handoff']}", flush=True)
        write(figures, args.json)
    pipe = build_pipeline(args)
    config = ConsiStoryConfig(num_inference_steps=args.steps, height=args.height, width=args.width)
    figures.update({
        "device": device_name(args.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "height": args.height,
        "width": args.width,
        "steps": args.steps,
        "n_anchors": config.n_anchors,
    })
    with torch.inference_mode():
        latent = initial_latents([2], (4, args.height // 8, args.width // 8), pipe.dtype, pipe.device)

        def vanilla():
            return pipe.sdxl(PROMPTS[2:3], num_inference_steps=args.steps, height=args.height, width=args.width,
                             guidance_scale=config.guidance_scale, latents=latent.clone(), output_type="np")

        vanilla()
        figures["codecs"] = {}
        for codec in ("exact", "compact"):
            figures["codecs"][codec] = codec_figures(pipe, args, config, codec, vanilla)
            print(f"--- {codec}", flush=True)
            report({k: v for k, v in figures["codecs"][codec].items() if not isinstance(v, (dict, list))}, None)
            write(figures, args.json)
        figures["exact_v1"] = {"full_counted_gb": full_counted_gb("exact_v1")}
        if args.device.startswith("cuda"):
            # Time to consistent subject: 2 anchors (compact cache) + 1 new image.
            def subject_and_image():
                made = pipe.create_anchors(PROMPTS[:2], ["dog"], seed=0, config=config, cache_codec="compact")
                return pipe.generate_from_anchors(made.cache, PROMPTS[2:3])

            subject_and_image()
            figures["time_to_consistent_subject_s"] = timed(subject_and_image, args.device)[0]
        write(figures, args.json)
        if not args.skip_fidelity:
            sets = PROMPT_SETS[: args.sets]
            print("fidelity of compact against exact:", flush=True)
            figures["codecs"]["compact"].update(measure_deviation(pipe, config, sets))
            write(figures, args.json)
            planted = plant_outlier_channels(pipe.sdxl.unet)
            pipe._fingerprint = None  # the weights changed
            print(f"fidelity with outlier channels planted in {planted} transformer blocks:", flush=True)
            with_outliers = measure_deviation(pipe, config, sets)
            figures["codecs"]["compact"]["deviation_ratio_planted_outliers"] = with_outliers["deviation_ratio"]
            figures["codecs"]["compact"]["psnr_db_planted_outliers"] = with_outliers["psnr_db"]
            write(figures, args.json)
    for codec, values in figures["codecs"].items():
        print(f"--- {codec}")
        report({k: v for k, v in values.items() if not isinstance(v, (dict, list))}, None)
        print(f"  full, 1024 px, fp16 (GB at mask fraction): {values['full_counted_gb']}")
    print(f"--- exact v1 full (GB): {figures['exact_v1']['full_counted_gb']}")
    print("---")
    report({k: v for k, v in figures.items() if not isinstance(v, (dict, list))}, None)
    if args.json is not None:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
