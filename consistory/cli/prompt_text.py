"""Prompts built from a style, a subject and a setting, reading as a sentence would.

"A photo of" + "dog" + "in the park" gives "A photo of a dog in the park": the subject gets an
indefinite article unless it already has a determiner, is a name (capitalized), is plural or a
count ("two dogs"), or the style already ends with one ("A photo of the").
"""

from __future__ import annotations

DETERMINERS = frozenset(
    """a an the this that these those my your his her its our their some any every each no
    one two three four five six seven eight nine ten several many few""".split()
)
# A vowel letter sounding like a consonant ("a unicorn", "a one-eyed cat") and the reverse
# ("an hour"): the letter alone would give the wrong article for these common openings.
_CONSONANT_SOUND = ("uni", "use", "usu", "ure", "uro", "eu", "one", "once", "ubiq", "uto")
_VOWEL_SOUND = ("hour", "honest", "honor", "honour", "heir")


def indefinite_article(word: str) -> str:
    w = word.lower()
    if w.startswith(_VOWEL_SOUND):
        return "an"
    if w.startswith(_CONSONANT_SOUND):
        return "a"
    return "an" if w[:1] and w[0] in "aeiou" else "a"


def _looks_plural(last_word: str) -> bool:
    w = last_word.lower()
    # "dogs", "cats", "boxes"; not "glass", "bus", "hummus", "chaos"-like singulars ending in s.
    return len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is", "os"))


def with_article(subject: str, style: str = "") -> str:
    """`subject` as it reads after `style`: "a dog", "an old wizard", "the cat" kept, "Alice" kept."""
    words = subject.split()
    if not words:
        return subject
    style_words = style.split()
    if style_words and style_words[-1].lower() in DETERMINERS:
        return subject
    first = words[0]
    if first.lower() in DETERMINERS or first.isdigit() or first[:1].isupper() or _looks_plural(words[-1]):
        return subject
    return f"{indefinite_article(first)} {subject}"


def setting_prompt(style: str, subject: str, setting: str) -> str:
    """STYLE + subject (with an article where it needs one) + SETTING, single-spaced."""
    parts = [style.strip(), with_article(subject.strip(), style), setting.strip()]
    return " ".join(p for p in parts if p)
