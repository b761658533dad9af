"""Numbers a client writes as text (headers, query strings, signed URLs), read strictly.

`str.isdigit()` passes superscripts and other scripts' digits that `int()` then refuses or reads
differently, and `int()` refuses more than 4300 digits: either was an answer 500. Only ASCII
digits, and only as many as the value can need, make a number here.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

_DIGITS = re.compile(r"[0-9]+")


def ascii_integer(text: str | bytes | None, max_digits: int) -> Optional[int]:
    """The non-negative integer `text` spells in 1 to `max_digits` ASCII digits, else None."""
    if text is None:
        return None
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            return None
    if len(text) > max_digits or not _DIGITS.fullmatch(text):
        return None
    return int(text)


def digits_only(max_digits: int) -> Callable[[object], object]:
    """A pydantic before-validator for a query parameter: ASCII digits, at most `max_digits`,
    where pydantic alone would also take "+5", " 5 ", "5.0" and "1_0"."""

    def check(value: object) -> object:
        if isinstance(value, str) and ascii_integer(value, max_digits) is None:
            raise ValueError(f"must be a whole number written in at most {max_digits} digits 0-9")
        return value

    return check
