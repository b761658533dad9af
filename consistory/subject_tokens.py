"""Where each subject's tokens sit in each prompt (ALGORITHM.md section 1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import InputError


@dataclass(frozen=True)
class SubjectTokens:
    """Token positions of every subject in every prompt of a batch."""

    positions: tuple[tuple[tuple[int, ...], ...], ...]  # [image][subject] -> positions
    sequence_length: int

    @property
    def present(self) -> torch.Tensor:
        """(B, S) bool: whether subject s occurs in prompt b."""
        return torch.tensor([[len(p) > 0 for p in per_image] for per_image in self.positions], dtype=torch.bool)

    def weights(self) -> torch.Tensor:
        """(B, S, T) averaging weights: a subject's map is the mean of its pieces' maps."""
        n_images, n_subjects = len(self.positions), len(self.positions[0])
        w = torch.zeros(n_images, n_subjects, self.sequence_length)
        for b, per_image in enumerate(self.positions):
            for s, pos in enumerate(per_image):
                if pos:
                    w[b, s, list(pos)] = 1.0 / len(pos)
        return w


def _pieces(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _find_run(haystack: Sequence[int], needle: Sequence[int], word_starts: Sequence[bool]) -> list[int]:
    """Positions of every occurrence of the contiguous run `needle` in `haystack` that begins a
    word (so "dog" is not found at the end of "hotdog")."""
    n = len(needle)
    found: list[int] = []
    if n == 0:
        return found
    for start in range(len(haystack) - n + 1):
        if word_starts[start] and list(haystack[start : start + n]) == list(needle):
            found.extend(range(start, start + n))
    return found


def _word_starts(tokenizer, ids: Sequence[int]) -> list[bool]:
    """Whether each token begins a word: CLIP's BPE marks the last piece of a word with </w>."""
    tokens = tokenizer.convert_ids_to_tokens(list(ids))
    special = set(tokenizer.all_special_tokens)
    return [i == 0 or tokens[i - 1] in special or tokens[i - 1].endswith("</w>") for i in range(len(tokens))]


def _subject_positions(tokenizer, prompt_ids: Sequence[int], subject: str) -> tuple[int, ...]:
    starts = _word_starts(tokenizer, prompt_ids)
    whole = _find_run(prompt_ids, _pieces(tokenizer, subject), starts)
    if whole:
        return tuple(sorted(set(whole)))
    # A phrase worded differently in the prompt ("the hat of a wizard" for "wizard hat"):
    # use whichever of the subject's words do occur.
    words: list[int] = []
    for word in subject.split():
        words.extend(_find_run(prompt_ids, _pieces(tokenizer, word), starts))
    return tuple(sorted(set(words)))


def find_subject_tokens(tokenizer, prompts: Sequence[str], subjects: Sequence[str]) -> SubjectTokens:
    """Locate every subject in every prompt with the first SDXL tokenizer (case-insensitive).

    Raises ValueError for a prompt that contains none of the subjects, naming both.
    """
    if not subjects or any(not s.strip() for s in subjects):
        raise InputError(f"subjects must be non-empty words or phrases (got {list(subjects)!r})")
    if not prompts:
        raise InputError("at least one prompt is needed")
    length = tokenizer.model_max_length
    positions = []
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"every prompt must be a non-empty string (got {prompt!r})")
        ids = tokenizer(prompt.lower(), padding="max_length", max_length=length, truncation=True)["input_ids"]
        per_subject = tuple(_subject_positions(tokenizer, ids, s.lower()) for s in subjects)
        if not any(per_subject):
            raise InputError(
                f"prompt {prompt!r} contains none of the subjects {list(subjects)!r}; "
                "every prompt must name at least one subject (within its first "
                f"{length - 2} tokens)"
            )
        positions.append(per_subject)
    return SubjectTokens(positions=tuple(positions), sequence_length=length)
