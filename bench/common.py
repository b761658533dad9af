"""Shared set-up for the benchmarks: presets, devices, timing and JSON output."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

from consistory.loading import load_pipeline, preset_id, resolve_device, resolve_dtype

# Size and step defaults per preset: tiny and small run on a laptop CPU, full is SDXL on a GPU.
PRESET_DEFAULTS = {
    "tiny": dict(size=128, steps=20),
    "small": dict(size=256, steps=20),
    "full": dict(size=1024, steps=50),
}

PROMPTS = [
    "A photo of a dog in the park",
    "A photo of a dog on the beach",
    "A photo of a dog in the snow",
    "A photo of a dog reading a book",
    "A photo of a dog in a cafe",
    "A photo of a dog on a boat",
    "A photo of a dog in the forest",
    "A photo of a dog at night",
]


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESET_DEFAULTS), default="small")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default per preset)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    defaults = PRESET_DEFAULTS[args.preset]
    args.steps = args.steps or defaults["steps"]
    args.height = args.height or defaults["size"]
    args.width = args.width or defaults["size"]
    device = resolve_device(args.device)
    args.device = str(device)
    args.dtype = resolve_dtype("auto", device)
    return args


def build_pipeline(args: argparse.Namespace):
    pipe = load_pipeline(preset_id(args.preset), args.device, args.dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.sdxl.set_progress_bar_config(disable=True)
    return pipe


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def report(figures: dict[str, Any], path: Path | None) -> None:
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {path}")
