"""Model resolution and loading for the `consistory` command line.

Checks a --model/--device choice before anything heavy runs (presets, hub ids, local
directories), picks the dtype, loads the pipeline, and refuses prompts that do not name
the subject before the weights are loaded. Problems with the command line raise
``UsageError``, which `consistory.cli.main` turns into exit status 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from transformers import CLIPTokenizer

from .pipeline import ConsiStoryPipeline
from .presets import PRESETS
from .subject_tokens import find_subject_tokens
from .tokenizer import build_local_clip_tokenizer


class UsageError(Exception):
    """The command line is wrong in a way argparse cannot see."""


def _say(message: str) -> None:
    print(f"consistory: {message}", file=sys.stderr, flush=True)


# --- models ---
def preset_of(model: str) -> tuple[str, int] | None:
    """("tiny", 0) for "tiny"; ("tiny", 3) for a cache's model id "preset:tiny:3"; None for weights."""
    if model in PRESETS:
        return model, 0
    if model.startswith("preset:"):
        parts = model.split(":")
        if len(parts) != 3 or parts[1] not in PRESETS or not parts[2].isdigit():
            raise UsageError(f"bad preset model id {model!r}; expected preset:<{'|'.join(PRESETS)}>:<seed>")
        return parts[1], int(parts[2])
    return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available")
    return torch.device(name)


def resolve_model(model: str) -> str:
    """Check a model argument before anything heavy runs; local directories become absolute."""
    if preset_of(model) is not None:
        return model
    path = Path(model).expanduser()
    if path.exists():
        return str(path.resolve())  # recorded in caches: absolute, so `extend` finds it from anywhere
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"no model directory at {model!r} (and it is not a hub id like org/name)")
    return model


def model_dtype(model: str, device: torch.device) -> torch.dtype:
    # Presets stay float32 on every device, so their caches move between CPU and GPU; real
    # weights run in fp16 on CUDA as the method does (ALGORITHM.md section 10).
    return torch.float16 if device.type == "cuda" and preset_of(model) is None else torch.float32


def load_pipeline(model: str, device: torch.device) -> ConsiStoryPipeline:
    preset = preset_of(model)
    if preset is not None:
        return ConsiStoryPipeline.from_preset(preset[0], seed=preset[1], device=device)
    if model_dtype(model, device) == torch.float32:
        return ConsiStoryPipeline.from_pretrained(model).to(device)
    try:
        pipe = ConsiStoryPipeline.from_pretrained(model, torch_dtype=torch.float16, variant="fp16")
    except (OSError, ValueError) as error:
        if "variant" not in str(error):
            raise
        # A checkpoint without fp16 files: load the full-precision files and cast them.
        pipe = ConsiStoryPipeline.from_pretrained(model, torch_dtype=torch.float16)
    return pipe.to(device)


def check_prompts(model: str, prompts: Sequence[str], subjects: Sequence[str]) -> None:
    """Refuse a prompt without the subject before spending a minute loading SDXL weights."""
    try:
        if preset_of(model) is not None:
            tokenizer = build_local_clip_tokenizer()
        else:
            tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    except (OSError, ValueError):
        return  # loading the model reports what is wrong with it
    find_subject_tokens(tokenizer, prompts, subjects)


def open_pipeline(model: str, device: torch.device, progress: bool) -> tuple[ConsiStoryPipeline, float]:
    _say(f"loading model {model} on {device}")
    t0 = time.perf_counter()
    pipe = load_pipeline(model, device)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe, time.perf_counter() - t0
