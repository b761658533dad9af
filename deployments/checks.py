"""Checks the Ingress makes before any model is touched, each answering a 4xx a person can act on.

The subject-word check is a fast approximation of the library's token match: it accepts a
prompt if any word of any subject occurs in it as a whole word, case-insensitively. It never
refuses a prompt the library would accept; the rare prompt it lets through that the library
refuses (a subject cut off by the 77-token limit) still comes back as a 422 from the model.
"""

from __future__ import annotations

import random
import re
from typing import Optional, Sequence

from fastapi import HTTPException

from consistory.config import ConsiStoryConfig
from consistory.seeds import MAX_SEED

from .schemas import SamplingFields
from .settings import ServiceSettings


def unprocessable(detail: str) -> HTTPException:
    return HTTPException(status_code=422, detail=detail)


def _mentions(prompt: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, flags=re.IGNORECASE) is not None


def prompt_mentions_subject(prompt: str, subjects: Sequence[str]) -> bool:
    return any(_mentions(prompt, word) for subject in subjects for word in subject.split())


def check_subjects(subjects: Sequence[str], settings: ServiceSettings) -> None:
    limit = settings.limits.max_subjects
    if len(subjects) > limit:
        raise unprocessable(f"too many subjects: {len(subjects)} given, at most {limit} per request")
    for i, subject in enumerate(subjects):
        if not subject.strip():
            raise unprocessable(f"subjects[{i}] is empty; give a word or phrase such as \"corgi\"")


def check_prompts(prompts: Sequence[str], subjects: Sequence[str], settings: ServiceSettings) -> None:
    limits = settings.limits
    if len(prompts) > limits.max_prompts:
        raise unprocessable(
            f"too many prompts: {len(prompts)} given, at most {limits.max_prompts} per request; "
            "split them over several requests (POST /v1/subjects/{id}/images adds images to a subject)"
        )
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise unprocessable(f"prompts[{i}] is empty; every prompt needs text naming the subject")
        if len(prompt) > limits.max_prompt_chars:
            raise unprocessable(f"prompts[{i}] has {len(prompt)} characters; at most {limits.max_prompt_chars}")
        if not prompt_mentions_subject(prompt, subjects):
            raise unprocessable(
                f"prompts[{i}] ({prompt!r}) contains none of the subjects {list(subjects)!r}; "
                "name the subject in every prompt (e.g. \"a photo of the corgi at the beach\")"
            )


def _check_size(name: str, value: int, limit: int) -> None:
    if value % 8 or not 32 <= value <= limit:
        lower = max(32, value - value % 8)
        hint = f"; try {min(lower, limit)}" if value > 0 else ""
        raise unprocessable(f"{name} must be a multiple of 8 between 32 and {limit} (got {value}){hint}")


def request_config(fields: SamplingFields, n_anchors: int, settings: ServiceSettings) -> ConsiStoryConfig:
    """The request's ConsiStoryConfig: the configured defaults overridden by what it sets."""
    base = settings.base_config()
    limits = settings.limits
    steps = fields.steps if fields.steps is not None else base.num_inference_steps
    height = fields.height if fields.height is not None else base.height
    width = fields.width if fields.width is not None else base.width
    if steps > limits.max_steps:
        raise unprocessable(f"steps must be at most {limits.max_steps} (got {steps})")
    _check_size("height", height, limits.max_height)
    _check_size("width", width, limits.max_width)
    if n_anchors > limits.max_anchors:
        raise unprocessable(f"too many anchors: {n_anchors}, at most {limits.max_anchors}")
    changes = {"num_inference_steps": steps, "height": height, "width": width, "n_anchors": n_anchors}
    if fields.guidance_scale is not None:
        changes["guidance_scale"] = fields.guidance_scale
    if fields.mask_dropout is not None:
        changes["mask_dropout"] = fields.mask_dropout
    try:
        return base.replace(**changes)
    except ValueError as error:
        raise unprocessable(str(error)) from None


def first_seed(seed: Optional[int], count: int) -> int:
    """The request's seed, or a random one; image i gets seed + i, so all of them must fit."""
    if seed is None:
        return random.randrange(0, 2**31)
    if seed + count - 1 > MAX_SEED:
        raise unprocessable(f"seed + {count - 1} exceeds the largest seed 2**63 - 1; use a smaller seed")
    return seed


def check_seeds(seeds: Optional[Sequence[int]], prompts: Sequence[str]) -> None:
    if seeds is not None and len(seeds) != len(prompts):
        raise unprocessable(
            f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt, "
            "or leave 'seeds' out to continue the anchors' seeds"
        )
