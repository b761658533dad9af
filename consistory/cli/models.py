"""The command line's use of the loading policy (`consistory.loading`): prompts checked with
the model's tokenizer before a minute goes into loading SDXL weights, and the pipeline opened
with a line on stderr saying what loads where."""

from __future__ import annotations

import sys
import time
from typing import Sequence

from ..loading import load_pipeline, load_tokenizer
from ..method.subject_tokens import find_subject_tokens


def check_prompts(model: str, prompts: Sequence[str], subjects: Sequence[str], cache_only: bool = False) -> None:
    """Refuse a prompt without the subject before spending a minute loading SDXL weights."""
    tokenizer = load_tokenizer(model, cache_only)
    if tokenizer is not None:
        find_subject_tokens(tokenizer, prompts, subjects)


def open_pipeline(model: str, device, progress: bool, cache_only: bool = False, compile: bool = False):
    """(the pipeline, seconds it took to load)."""
    print(f"consistory: loading model {model} on {device}" + (" from the local cache" if cache_only else ""),
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    pipe = load_pipeline(model, device, cache_only=cache_only, compile=compile)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe, time.perf_counter() - t0
