"""Where each subject's tokens sit in each prompt (docs/method.md section 1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import InputError


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


END_OF_WORD = "</w>"  # CLIP's BPE marks the last piece of every word with it
# Endings after which English plurals take "-es" rather than "-s" (boxes, buses, dishes, tomatoes).
_ES_AFTER = ("s", "x", "z", "ch", "sh", "o")


def _words(tokenizer, ids: Sequence[int]) -> list[tuple[str, tuple[int, ...]]]:
    """The words of a tokenized text: (spelling in the tokenizer's alphabet, token positions).

    CLIP's pre-tokenizer cuts punctuation and "'s" into words of their own, so "dog's" and
    "dog," both hold the word "dog". Special tokens (start, end, padding) are no words.
    """
    tokens = tokenizer.convert_ids_to_tokens(list(ids))
    special = set(tokenizer.all_special_tokens)
    words: list[tuple[int, ...]] = []
    current: list[int] = []
    for i, token in enumerate(tokens):
        if token in special:
            continue
        current.append(i)
        if token.endswith(END_OF_WORD):
            words.append(tuple(current))
            current = []
    if current:  # a word cut by truncation
        words.append(tuple(current))
    return [("".join(tokens[i] for i in word).removesuffix(END_OF_WORD), word) for word in words]


def inflections(word: str) -> set[str]:
    """The regular plural forms of `word`: dog -> dogs, box -> boxes, puppy -> puppies."""
    forms = {word + "es" if word.endswith(_ES_AFTER) else word + "s"}
    if len(word) > 2 and word.endswith("y") and word[-2] not in "aeiou":
        forms.add(word[:-1] + "ies")
    return forms


def same_word(prompt_word: str, subject_word: str) -> bool:
    """Equal, or one the other's regular plural ("macaron" names "macarons" and back); never a
    longer word that merely contains it ("dog" is not "hotdog", nor "dogma")."""
    return (prompt_word == subject_word or prompt_word in inflections(subject_word)
            or subject_word in inflections(prompt_word))


def _match_words(prompt_words, subject_words: Sequence[str], inflect_every_word: bool) -> list[int]:
    """Token positions of every run of prompt words spelling `subject_words` in order. Only the
    phrase's last word may be inflected ("polar bears"), unless `inflect_every_word`."""
    n = len(subject_words)
    found: list[int] = []
    for start in range(len(prompt_words) - n + 1):
        run = prompt_words[start : start + n]
        if all(
            same_word(spelled, wanted) if inflect_every_word or j == n - 1 else spelled == wanted
            for j, ((spelled, _), wanted) in enumerate(zip(run, subject_words))
        ):
            found.extend(p for _, positions in run for p in positions)
    return found


def _subject_positions(tokenizer, prompt_ids: Sequence[int], subject: str) -> tuple[int, ...]:
    prompt_words = _words(tokenizer, prompt_ids)
    subject_words = [spelled for spelled, _ in _words(tokenizer, tokenizer(subject, add_special_tokens=False)["input_ids"])]
    if not subject_words:
        return ()
    whole = _match_words(prompt_words, subject_words, inflect_every_word=False)
    if whole:
        return tuple(sorted(set(whole)))
    # A phrase worded differently in the prompt ("the hats of two wizards" for "wizard hat"):
    # use whichever of the subject's words do occur.
    words: list[int] = []
    for word in subject_words:
        words.extend(_match_words(prompt_words, [word], inflect_every_word=True))
    return tuple(sorted(set(words)))


def find_subject_tokens(tokenizer, prompts: Sequence[str], subjects: Sequence[str]) -> SubjectTokens:
    """Locate every subject in every prompt with the first SDXL tokenizer (case-insensitive).

    A subject's word also matches its regular plural ("macaron" in "... delicate macarons") and
    the other way round. Raises InputError for a prompt that contains none of the subjects,
    naming both.
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
