"""Checks the Ingress makes before any model is touched, each answering a 4xx a person can act on.

The subject-word check is a fast approximation of the library's token match (one pattern per
request: any word of any subject as a whole word, any case); `check_subject_tokens` then runs the
library's own match with the model's tokenizer, so that a prompt whose subject falls past CLIP's
77 tokens is refused before anything is generated. Callers run these off the event loop.
"""

from __future__ import annotations

import functools
import random
import re
import unicodedata
from typing import Optional, Sequence

from consistory.config import ConsiStoryConfig
from consistory.seeds import MAX_SEED

from ..errors import unprocessable
from ..settings import ServiceSettings
from .schemas import SamplingFields

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Format characters (Unicode category Cf) are invisible: bidirectional overrides and isolates
# (U+202A-202E, U+2066-2069) show a prompt in another order than the model reads it, zero-width
# spaces and U+FEFF hide text in what is echoed back. The two joiners stay allowed: emoji
# sequences and Persian and Indic spelling need them, and they reorder nothing.
_JOINERS = frozenset("\u200c\u200d")


def check_text(where: str, text: str) -> None:
    """Text a tokenizer and a JSON record can take: valid Unicode, no control characters, no
    invisible formatting characters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise unprocessable(
            f"{where} contains an unpaired UTF-16 surrogate at character {error.start}; send valid Unicode text"
        ) from None
    control = _CONTROL.search(text)
    if control:
        raise unprocessable(f"{where} contains a control character ({control.group()!r}) at {control.start()}; remove it")
    for position, char in enumerate(text):
        if char not in _JOINERS and unicodedata.category(char) == "Cf":
            name = unicodedata.name(char, "a format character")
            raise unprocessable(f"{where} contains an invisible formatting character (U+{ord(char):04X} {name}) at "
                                f"{position}; remove it: such characters reorder or hide text")


@functools.lru_cache(maxsize=256)
def subject_pattern(subjects: tuple[str, ...]) -> re.Pattern:
    """One pattern for all subject words of a request (whole words, any case)."""
    words = sorted({word for subject in subjects for word in subject.split()}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)", re.IGNORECASE)


def prompt_mentions_subject(prompt: str, subjects: Sequence[str]) -> bool:
    return subject_pattern(tuple(subjects)).search(prompt) is not None


def check_subjects(subjects: Sequence[str], settings: ServiceSettings) -> None:
    limits = settings.limits
    if len(subjects) > limits.max_subjects_per_request:
        raise unprocessable(
            f"too many subjects: {len(subjects)} given, at most {limits.max_subjects_per_request} per request")
    for i, subject in enumerate(subjects):
        check_text(f"subjects[{i}]", subject)
        if not subject.strip():
            raise unprocessable(f"subjects[{i}] is empty; give a word or phrase such as \"corgi\"")
        if len(subject) > limits.max_subject_chars or len(subject.split()) > limits.max_subject_words:
            raise unprocessable(
                f"subjects[{i}] is too long; a subject is a word or short phrase of at most "
                f"{limits.max_subject_words} words and {limits.max_subject_chars} characters"
            )


def check_prompts(prompts: Sequence[str], subjects: Sequence[str], settings: ServiceSettings) -> None:
    limits = settings.limits
    if len(prompts) > limits.max_prompts:
        raise unprocessable(
            f"too many prompts: {len(prompts)} given, at most {limits.max_prompts} per request; "
            "split them over several requests (POST /v1/subjects/{id}/images adds images to a subject)"
        )
    for i, prompt in enumerate(prompts):
        check_text(f"prompts[{i}]", prompt)
        if not prompt.strip():
            raise unprocessable(f"prompts[{i}] is empty; every prompt needs text naming the subject")
        if len(prompt) > limits.max_prompt_chars:
            raise unprocessable(f"prompts[{i}] has {len(prompt)} characters; at most {limits.max_prompt_chars}")
        if not prompt_mentions_subject(prompt, subjects):
            raise unprocessable(
                f"prompts[{i}] ({prompt[:200]!r}) contains none of the subjects {list(subjects)!r}; "
                "name the subject in every prompt (e.g. \"a photo of the corgi at the beach\")"
            )


def check_subject_tokens(tokenizer, prompts: Sequence[str], subjects: Sequence[str]) -> None:
    """The library's own token match (subjects within the prompt's first 77 tokens), before any
    model is called, so a story never fails after its anchors for a prompt the model refuses."""
    from consistory.errors import InputError
    from consistory.method.subject_tokens import find_subject_tokens

    if tokenizer is None:
        return
    try:
        find_subject_tokens(tokenizer, prompts, subjects)
    except InputError as error:
        raise unprocessable(str(error)) from None


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
        if fields.guidance_scale > limits.max_guidance_scale:
            raise unprocessable(
                f"guidance_scale must be at most {limits.max_guidance_scale:g} (got {fields.guidance_scale:g})"
            )
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


def check_continued_seeds(seeds: Sequence[int]) -> None:
    """New images without seeds continue the anchors' seeds; near the top they run out."""
    if seeds and max(seeds) > MAX_SEED:
        raise unprocessable("new images without seeds continue the subject's anchor seeds, which here pass the "
                            "largest seed 2**63 - 1; give 'seeds', one per prompt")


def check_seeds(seeds: Optional[Sequence[int]], prompts: Sequence[str]) -> None:
    if seeds is not None and len(seeds) != len(prompts):
        raise unprocessable(
            f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt, "
            "or leave 'seeds' out to continue the anchors' seeds"
        )
