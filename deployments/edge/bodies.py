"""Reading a request body at the edge: bounded in bytes and in time, and JSON the parser can take.

- Larger than `max_bytes` is 413, a declared Content-Length before anything is read.
- A body must keep up with a minimum rate: after `allowance_s` it must have come at
  `min_bytes_per_s` (mod_reqtimeout's MinRate: each byte buys 1 / rate seconds more), else 408.
  The body is read inside the Ingress replica, where the request already holds a slot of its
  max_ongoing_requests, so a client trickling a body a byte at a time would hold that slot for
  as long as the proxy lets it (300 s); here it gets `allowance_s`.
- JSON that is not UTF-8, nests past MAX_JSON_DEPTH, or has a number with more than
  MAX_NUMBER_DIGITS digits is 422: Python's parser would recurse until it fails, or refuse an
  integer of more than 4300 digits, and FastAPI answer either with an undocumented 400.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from ..numbers import ascii_integer

MAX_JSON_DEPTH = 32  # the API's bodies nest 3 deep
MAX_NUMBER_DIGITS = 100  # seeds have 19; a number longer than this is never one the API takes
Receive = Callable[[], Awaitable[dict[str, Any]]]

# A string runs to its closing quote or, unterminated, to the end of the body: a match never
# fails, so the scan is linear. (Requiring the closing quote made a body of `"` and escaped
# quotes quadratic: each escaped quote began another match that ran to the end, and then failed.)
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")
_LONG_NUMBER = re.compile(rb"[0-9]{%d,}" % (MAX_NUMBER_DIGITS + 1))


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int
    allowance_s: float
    min_bytes_per_s: int


@dataclass(frozen=True)
class Refusal:
    """An answer instead of the body; `close`: the body was not read to its end."""

    status: int
    detail: str
    close: bool = True


async def read_body(headers: dict[bytes, bytes], receive: Receive, limits: BodyLimits) -> bytes | Refusal | None:
    """The whole body, a Refusal, or None if the client left."""
    too_big = Refusal(413, f"the request body is larger than {limits.max_bytes} bytes; send fewer or shorter "
                           "prompts, or smaller images")
    # A Content-Length that is not a number is ignored: the proxy framed the body, and what is
    # read is counted anyway.
    declared = ascii_integer(headers.get(b"content-length"), max_digits=18)
    if declared is not None and declared > limits.max_bytes:
        return too_big
    loop = asyncio.get_running_loop()
    started = loop.time()
    parts: list[bytes] = []
    size = 0
    while True:
        left = started + limits.allowance_s + size / limits.min_bytes_per_s - loop.time()
        try:
            if left <= 0:
                raise TimeoutError
            async with asyncio.timeout(left):
                message = await receive()
        except TimeoutError:
            return Refusal(408, f"the request body came too slowly ({size} bytes in {loop.time() - started:.0f} s); "
                                f"after the first {limits.allowance_s:g} s the service needs "
                                f"{limits.min_bytes_per_s} bytes per second: send the body at once")
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limits.max_bytes:
            return too_big
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def json_problem(body: bytes) -> Optional[str]:
    """Why a JSON body cannot go to the parser, or None."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"the request body is not UTF-8 (byte {error.start}); send JSON encoded as UTF-8"
    outside_strings = _JSON_STRING.sub(b'""', body)
    if too_deep(outside_strings, MAX_JSON_DEPTH, strings_removed=True):
        return f"the request body nests deeper than {MAX_JSON_DEPTH} levels; send the flat JSON object the API documents"
    if _LONG_NUMBER.search(outside_strings):
        return (f"the request body has a number of more than {MAX_NUMBER_DIGITS} digits; no field takes one "
                "(seeds are below 2**63)")
    return None


def too_deep(body: bytes, limit: int, strings_removed: bool = False) -> bool:
    """Whether JSON nests deeper than `limit` (strings' contents ignored)."""
    depth = 0
    text = body if strings_removed else _JSON_STRING.sub(b'""', body)
    for match in _BRACKET.finditer(text):
        depth += 1 if match.group() in (b"[", b"{") else -1
        if depth > limit:
            return True
    return False


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel that gives the already-read body once, then the client's own messages
    (so a disconnect still reaches the app)."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
