"""What every HTTP request meets before a route sees it: a request id, and a bounded body.

- `X-Request-ID`: Serve's proxy gives every request one (the client's own if it sent one) and
  returns it on every answer; the edge adopts it, or makes one and returns it itself where no
  proxy did. It is put in error bodies that are the service's fault and carried by every log line
  about the request (`request_id` on the record), with characters other than letters, digits,
  `.`, `_` and `-` replaced and cut to 128, so that a client cannot forge log lines.
- Bodies: larger than `max_bytes` is 413 before anything parses it (a declared Content-Length is
  refused without reading); a JSON body that is not UTF-8 is 422 instead of FastAPI's
  undocumented 400.
- A deadline of the service's own: a request still running after `deadline_s` is cancelled and
  answered 503. Serve's proxy lets clients lift its timeout (`x-request-timeout-seconds`) and its
  cancel-on-disconnect (`x-request-disconnect-disabled`); whatever they send, no request holds
  the service longer than this.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import math
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

REQUEST_ID_HEADER = "x-request-id"
MAX_JSON_DEPTH = 32  # the API's bodies nest 3 deep
SCOPE_KEY = "consistory.request_id"
_UNSAFE_IN_ID = re.compile(r"[^A-Za-z0-9._-]")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def current_request_id(scope: dict | None = None) -> str:
    if scope is not None and SCOPE_KEY in scope:
        return scope[SCOPE_KEY]
    return request_id_var.get()


class RequestIdLogFilter(logging.Filter):
    """Adds `request_id` to every log record made while a request is handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


@dataclass
class EdgeLimits:
    """The body limit and the deadline; the Ingress sets them from its settings when it starts."""

    max_bytes: int = 64 * 1024
    deadline_s: float = 600.0
    retry_after_s: float = 5.0


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


def loggable_id(given: str) -> str:
    return _UNSAFE_IN_ID.sub("_", given)[:128]


async def _answer(send: Send, status: int, detail: str, retry_after: float | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HttpEdge:
    """ASGI middleware: request ids and body limits (see the module docstring)."""

    def __init__(self, app, limit: EdgeLimits) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = _header(scope, REQUEST_ID_HEADER.encode())
        request_id = loggable_id(given.decode("latin-1")) if given else uuid.uuid4().hex
        scope[SCOPE_KEY] = request_id  # for handlers that run outside this middleware (500s)
        token = request_id_var.set(request_id)
        # Where a proxy set the id it also returns it: a second header would repeat it.
        ours = [(REQUEST_ID_HEADER.encode(), request_id.encode())] if not given else []
        try:
            async def send_with_id(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                    message = {**message, "headers": headers + ours}
                await send(message)

            if scope["method"] not in ("GET", "HEAD", "OPTIONS", "DELETE"):
                body = await self._read_body(scope, receive, send_with_id)
                if body is None:
                    return
                content_type = (_header(scope, b"content-type") or b"").decode("latin-1").lower()
                if "json" in content_type:
                    try:
                        body.decode("utf-8")
                    except UnicodeDecodeError as error:
                        return await _answer(send_with_id, 422, f"the request body is not UTF-8 (byte "
                                                                f"{error.start}); send JSON encoded as UTF-8")
                    if too_deep(body, MAX_JSON_DEPTH):
                        return await _answer(send_with_id, 422, f"the request body nests deeper than "
                                                                f"{MAX_JSON_DEPTH} levels; send the flat JSON "
                                                                "object the API documents")
                receive = _replay(body, receive)
            await self._within_deadline(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)

    async def _within_deadline(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, tracking), timeout=self.limit.deadline_s)
        except asyncio.TimeoutError:
            if not started:
                await _answer(send, 503, f"the request took longer than {self.limit.deadline_s:g} s and was "
                                         "stopped; retry later, or with fewer prompts",
                              retry_after=self.limit.retry_after_s)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        limit = self.limit.max_bytes
        too_big = f"the request body is larger than {limit} bytes; send fewer or shorter prompts"
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _answer(send, 413, too_big)
            return None
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _answer(send, 413, too_big)
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(rb"[\[\]{}]")


def too_deep(body: bytes, limit: int) -> bool:
    """Whether JSON nests deeper than `limit` (strings' contents ignored). Python's parser would
    otherwise recurse until it fails, and FastAPI answer that with an undocumented 400."""
    depth = 0
    for match in _BRACKET.finditer(_JSON_STRING.sub(b'""', body)):
        depth += 1 if match.group() in (b"[", b"{") else -1
        if depth > limit:
            return True
    return False


def _replay(body: bytes, receive: Receive) -> Receive:
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
