"""One GPU benchmark: what ConsiStory costs against vanilla SDXL on one device, in one run.

    python bench/gpu_suite.py --preset full --json bench/results/gpu-suite.json   # an H100/H200: under 8 min
    python bench/gpu_suite.py --preset tiny                                       # a smoke run on a CPU

The preset is built directly on the device (`build_preset_sdxl(..., on_device=True)`: seconds
for "full" on a GPU), in fp16 on CUDA. Then, in this order (the first story is the first
generation of the process, so it carries every one-time cost):

1. the story of 3 (2 anchors), first call in the process, then warm; eager;
2. `warm_up` at batch 1, 2, 4 and 8 (what a service replica does before reporting ready);
3. vanilla SDXL (diffusers' own pipeline call, same components) at batch 1, 3 and 8;
4. anchors: `create_anchors` of 2, exact and compact codec (recorded to host memory, as the
   service does);
5. new images from each cache at batch 1, 2, 4 and 8;
6. compiled (`pipe.compile = True`): the story of 3, first call (it compiles) and warm.

Every figure has seconds, images, images/s and peak device memory; the headlines are ratios
within this one run: story / vanilla batch 3, one new image / vanilla batch 1, and images/s at
batch 8. Figures are written to `--json` after each measurement, so a run cut short keeps what
it measured; a step that would not fit in `--budget-s` is skipped and says so.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import PROMPTS, add_common_args, device_name, resolve, timed

from consistory import ConsiStoryConfig, ConsiStoryPipeline
from consistory.presets.sdxl import build_preset_sdxl

SUBJECTS = ["dog"]
STORY = 3
EXTEND_BATCHES = (1, 2, 4, 8)
VANILLA_BATCHES = (1, 3, 8)
COMPILE_RESERVE_S = 240  # what the compiled story needs at least (compiling the full UNet takes minutes)


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cuda = args.device.startswith("cuda")
        self.start = time.perf_counter()
        self.rows: dict[str, dict] = {}
        self.figures: dict = {"device": device_name(args.device), "preset": args.preset,
                              "dtype": str(args.dtype).removeprefix("torch."), "size": f"{args.height}x{args.width}",
                              "steps": args.steps, "torch": torch.__version__, "budget_s": args.budget_s}

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def measure(self, name: str, images: int, fn, note: str = ""):
        """Time `fn` (the device drained before and after) and keep its peak device memory."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds, result = timed(fn, self.args.device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
        self.rows[name] = {"s": seconds, "images": images, "images_per_s": images / seconds, "peak_gib": peak,
                           **({"note": note} if note else {})}
        print(f"  {name:<28} {seconds:8.2f} s  {images / seconds:7.3f} img/s"
              + (f"  peak {peak:6.1f} GiB" if peak is not None else ""), flush=True)
        self.save()
        return result

    def skip(self, name: str, why: str) -> None:
        self.rows[name] = {"skipped": why}
        print(f"  {name:<28} skipped: {why}", flush=True)
        self.save()

    def ratio(self, key: str, numerator: str, denominator: str, field: str = "s") -> None:
        a, b = self.rows.get(numerator, {}), self.rows.get(denominator, {})
        if field in a and field in b:
            self.figures[key] = a[field] / b[field]

    def save(self) -> None:
        self.figures["elapsed_s"] = time.perf_counter() - self.start
        self.figures["measurements"] = self.rows
        if self.args.json is not None:
            self.args.json.parent.mkdir(parents=True, exist_ok=True)
            self.args.json.write_text(json.dumps(self.figures, indent=2) + "\n")


def build(args: argparse.Namespace) -> ConsiStoryPipeline:
    sdxl = build_preset_sdxl(args.preset, torch_dtype=args.dtype, device=args.device, on_device=True)
    pipe = ConsiStoryPipeline(sdxl, model_id=f"bench:{args.preset}-on-device")
    pipe.set_progress_bar_config(disable=True)
    pipe.sdxl.set_progress_bar_config(disable=True)
    return pipe


def prompts(n: int, offset: int = 0) -> list[str]:
    return [PROMPTS[(offset + i) % len(PROMPTS)] for i in range(n)]


def run(suite: Suite, pipe: ConsiStoryPipeline, config: ConsiStoryConfig) -> None:
    args = suite.args
    story = lambda: pipe.generate_story(prompts(STORY), SUBJECTS, seed=0, config=config, output_type="np")  # noqa: E731
    suite.measure("story3_first_call", STORY, story, "first generation of the process, eager")
    suite.measure("story3", STORY, story, "eager, warm")

    t0 = time.perf_counter()
    suite.figures["warm_up_s"] = pipe.warm_up(config, batch_sizes=EXTEND_BATCHES)
    suite.figures["warm_up_total_s"] = time.perf_counter() - t0

    for b in VANILLA_BATCHES:
        suite.measure(f"vanilla_b{b}", b, lambda b=b: pipe.sdxl(
            prompts(b), num_inference_steps=args.steps, height=args.height, width=args.width,
            guidance_scale=config.guidance_scale, output_type="np"))

    caches = {}
    for codec in ("exact", "compact"):
        caches[codec] = suite.measure(f"anchors2_{codec}", 2, lambda codec=codec: pipe.create_anchors(
            prompts(2), SUBJECTS, seed=0, config=config, output_type="np", cache_device="cpu",
            cache_codec=codec)).cache
        suite.figures[f"cache_{codec}_gib"] = caches[codec].nbytes / 2**30
    for codec, cache in caches.items():
        for b in EXTEND_BATCHES:
            suite.measure(f"new_b{b}_{codec}", b, lambda b=b, cache=cache: pipe.generate_from_anchors(
                cache, prompts(b, offset=2), output_type="np"))

    if args.skip_compile:
        suite.skip("story3_compiled_first_call", "--skip-compile")
    elif suite.left_s() < COMPILE_RESERVE_S:
        suite.skip("story3_compiled_first_call", f"{suite.left_s():.0f} s of the budget left")
    else:
        pipe.compile = True
        suite.measure("story3_compiled_first_call", STORY, story, "compiles the UNet for this size and batch")
        suite.measure("story3_compiled", STORY, story, "compiled, warm")


def headlines(suite: Suite) -> None:
    suite.ratio("story3_over_vanilla_b3", "story3", "vanilla_b3")
    suite.ratio("story3_compiled_over_vanilla_b3", "story3_compiled", "vanilla_b3")
    if "s" in suite.rows.get("story3_first_call", {}) and "s" in suite.rows.get("story3", {}):
        suite.figures["story3_first_call_extra_s"] = suite.rows["story3_first_call"]["s"] - suite.rows["story3"]["s"]
    for codec in ("exact", "compact"):
        suite.ratio(f"new_b1_{codec}_over_vanilla_b1", f"new_b1_{codec}", "vanilla_b1")
        suite.ratio(f"images_per_s_b8_{codec}_over_vanilla_b8", f"new_b8_{codec}", "vanilla_b8", "images_per_s")
    for name in ("vanilla_b8", "new_b8_exact", "new_b8_compact"):
        if "images_per_s" in suite.rows.get(name, {}):
            suite.figures[f"images_per_s_{name}"] = suite.rows[name]["images_per_s"]


def print_table(suite: Suite) -> None:
    print(f"\n{'measurement':<28} {'s':>8} {'img':>4} {'img/s':>8} {'s/img':>8} {'peak GiB':>9}")
    for name, row in suite.rows.items():
        if "skipped" in row:
            print(f"{name:<28} skipped: {row['skipped']}")
            continue
        peak = f"{row['peak_gib']:9.2f}" if row["peak_gib"] is not None else f"{'-':>9}"
        print(f"{name:<28} {row['s']:8.2f} {row['images']:4d} {row['images_per_s']:8.3f} "
              f"{row['s'] / row['images']:8.2f} {peak}")
    print()
    for key, value in suite.figures.items():
        if key != "measurements":
            print(f"{key:<40} {value:.4g}" if isinstance(value, float) else f"{key:<40} {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.set_defaults(preset="full")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the compiled story")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-clock budget of the run; a step that would not fit is skipped (default 480)")
    args = resolve(parser.parse_args())
    suite = Suite(args)
    t0 = time.perf_counter()
    pipe = build(args)
    if suite.cuda:
        torch.cuda.synchronize()
    suite.figures["build_s"] = time.perf_counter() - t0
    config = ConsiStoryConfig(num_inference_steps=args.steps, height=args.height, width=args.width)
    print(f"{suite.figures['device']}: preset {args.preset}, {args.height}x{args.width}, {args.steps} steps, "
          f"built in {suite.figures['build_s']:.1f} s", flush=True)
    try:
        run(suite, pipe, config)
    finally:
        headlines(suite)
        suite.save()
        print_table(suite)
        if args.json is not None:
            print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
