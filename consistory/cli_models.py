"""Model resolution and loading for the `consistory` command line.

Checks a --model/--device choice before anything heavy runs (presets, hub ids, local
directories, whether the hub can be reached), picks the dtype, loads the pipeline, and refuses
prompts that do not name the subject before the weights are loaded. Problems with the command
line raise ``UsageError``, which `consistory.cli.main` turns into exit status 2.
"""

from __future__ import annotations

import sys
import time
from typing import Sequence

import torch
from transformers import CLIPTokenizer

from .errors import UsageError
from .hub_access import cache_only as hub_cache_only
from .model_ids import is_local_model, preset_of, resolve_model
from .pipeline import ConsiStoryPipeline
from .subject_tokens import find_subject_tokens
from .tokenizer import build_local_clip_tokenizer

__all__ = ["UsageError", "check_prompts", "load_pipeline", "locate_model", "model_dtype", "open_pipeline",
           "preset_of", "resolve_device", "resolve_model", "subject_tokenizer"]


def _say(message: str) -> None:
    print(f"consistory: {message}", file=sys.stderr, flush=True)


# --- models ---
def locate_model(model: str) -> bool:
    """For a resolved model: True when it must load from the local Hugging Face cache only (a
    hub id while the hub is unreachable or HF_HUB_OFFLINE is set). Raises ModelUnavailable."""
    if preset_of(model) is not None or is_local_model(model):
        return False
    return hub_cache_only(model)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available")
    return torch.device(name)


def model_dtype(model: str, device: torch.device) -> torch.dtype:
    # Presets stay float32 on every device, so their caches move between CPU and GPU; real
    # weights run in fp16 on CUDA as the method does (ALGORITHM.md section 10).
    return torch.float16 if device.type == "cuda" and preset_of(model) is None else torch.float32


def load_pipeline(model: str, device: torch.device, cache_only: bool = False) -> ConsiStoryPipeline:
    preset = preset_of(model)
    if preset is not None:
        return ConsiStoryPipeline.from_preset(preset[0], seed=preset[1], device=device)
    if model_dtype(model, device) == torch.float32:
        return ConsiStoryPipeline.from_pretrained(model, local_files_only=cache_only).to(device)
    try:
        pipe = ConsiStoryPipeline.from_pretrained(model, torch_dtype=torch.float16, variant="fp16",
                                                  local_files_only=cache_only)
    except (OSError, ValueError) as error:
        if "variant" not in str(error):
            raise
        # A checkpoint without fp16 files: load the full-precision files and cast them.
        pipe = ConsiStoryPipeline.from_pretrained(model, torch_dtype=torch.float16, local_files_only=cache_only)
    return pipe.to(device)


def subject_tokenizer(model: str, cache_only: bool = False) -> CLIPTokenizer | None:
    """The model's first tokenizer (the one subjects are found with), or None where it cannot be
    read without loading the model (loading the model then reports what is wrong with it)."""
    try:
        if preset_of(model) is not None:
            return build_local_clip_tokenizer()
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=cache_only)
    except (OSError, ValueError):
        return None
    # transformers can hand back an empty tokenizer (no vocabulary, no length limit) for files it
    # could not read; finding subjects with it would fail in confusing ways.
    if len(tokenizer) <= len(tokenizer.all_special_tokens) or tokenizer.model_max_length > 100_000:
        return None
    return tokenizer


def check_prompts(model: str, prompts: Sequence[str], subjects: Sequence[str], cache_only: bool = False) -> None:
    """Refuse a prompt without the subject before spending a minute loading SDXL weights."""
    tokenizer = subject_tokenizer(model, cache_only)
    if tokenizer is not None:
        find_subject_tokens(tokenizer, prompts, subjects)


def open_pipeline(model: str, device: torch.device, progress: bool,
                  cache_only: bool = False) -> tuple[ConsiStoryPipeline, float]:
    _say(f"loading model {model} on {device}" + (" from the local cache" if cache_only else ""))
    t0 = time.perf_counter()
    pipe = load_pipeline(model, device, cache_only)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe, time.perf_counter() - t0
