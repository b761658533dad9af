"""What every HTTP request meets before a route sees it: a request id, and a bounded body.

- `X-Request-ID`: a client's id is kept if it is short and plain (letters, digits, `.`, `_`,
  `-`), otherwise one is made. It is returned on every answer, put in error bodies that are the
  service's fault, and carried by every log line about the request (`request_id` on the record).
- Bodies: larger than `max_bytes` is 413 before anything parses it (a declared Content-Length is
  refused without reading); a JSON body that is not UTF-8 is 422 instead of FastAPI's
  undocumented 400.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

REQUEST_ID_HEADER = "x-request-id"
SCOPE_KEY = "consistory.request_id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

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
class BodyLimit:
    """The body limit; the Ingress sets it from its settings when it starts."""

    max_bytes: int = 64 * 1024


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


async def _answer(send: Send, status: int, detail: str, request_id: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (REQUEST_ID_HEADER.encode(), request_id.encode())],
    })
    await send({"type": "http.response.body", "body": body})


class HttpEdge:
    """ASGI middleware: request ids and body limits (see the module docstring)."""

    def __init__(self, app, limit: BodyLimit) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = (_header(scope, REQUEST_ID_HEADER.encode()) or b"").decode("latin-1")
        request_id = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        scope[SCOPE_KEY] = request_id  # for handlers that run outside this middleware (500s)
        token = request_id_var.set(request_id)
        try:
            async def send_with_id(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                    message = {**message, "headers": headers + [(REQUEST_ID_HEADER.encode(), request_id.encode())]}
                await send(message)

            if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
                return await self.app(scope, receive, send_with_id)
            body = await self._read_body(scope, receive, send, request_id)
            if body is None:
                return
            content_type = (_header(scope, b"content-type") or b"").decode("latin-1").lower()
            if "json" in content_type:
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError as error:
                    return await _answer(send, 422, f"the request body is not UTF-8 (byte {error.start}); "
                                                    "send JSON encoded as UTF-8", request_id)
            await self.app(scope, _replay(body, receive), send_with_id)
        finally:
            request_id_var.reset(token)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> bytes | None:
        limit = self.limit.max_bytes
        too_big = f"the request body is larger than {limit} bytes; send fewer or shorter prompts"
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _answer(send, 413, too_big, request_id)
            return None
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _answer(send, 413, too_big, request_id)
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


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
