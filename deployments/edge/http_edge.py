"""What every HTTP request meets before a route sees it: a request id, bounded headers, a bounded
number of requests in flight, the caller known before any body is read, and a bounded body.

- `X-Request-ID`: Serve's proxy gives every request one (the client's own if it sent one) and
  returns it on every answer; the edge adopts it, or makes one and returns it itself where no
  proxy did. It is put in error bodies that are the service's fault and carried by every log line
  about the request (`request_id` on the record), with characters other than letters, digits,
  `.`, `_` and `-` replaced and cut to 128, so that a client cannot forge log lines.
- Headers larger than `max_header_bytes` get 431 (the proxy has already read them: the load
  balancer in front is what keeps larger ones out: "Load balancer limits" in cluster/README.md).
- At most `max_requests` requests in flight on this replica, event streams included; past that,
  503 with Retry-After at once. The probes (/healthz, /readyz) never count and are never refused,
  and the Ingress's max_ongoing_requests keeps slots above `max_requests` for them: a probe never
  waits behind user requests in the proxy's queue.
- A request with a body meets `gate` first (the API key: 401, or 429 over its rate), so a
  client without a key cannot hold a slot by sending a body slowly; then, only where a route
  takes that method at that path (`takes_body`), the body is read within its size and time
  limits (bodies.py: 413, 408, 422); elsewhere the app answers 404 or 405 without reading it.
- A deadline of the service's own: a request still running after `deadline_s` is cancelled and
  answered 503. Serve's proxy lets clients lift its timeout (`x-request-timeout-seconds`) and its
  cancel-on-disconnect (`x-request-disconnect-disabled`); whatever they send, no request holds
  the service longer than this.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from ..errors import ServiceError
from ..request_ids import SCOPE_KEY, request_id_var
from .bodies import BodyLimits, Refusal, json_problem, read_body, replay

REQUEST_ID_HEADER = "x-request-id"
PROBES = ("/healthz", "/readyz")
_UNSAFE_IN_ID = re.compile(r"[^A-Za-z0-9._-]")
_BODILESS = ("GET", "HEAD", "OPTIONS", "DELETE")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Gate = Callable[[Scope], None]  # raises ServiceError to refuse a request before its body is read


@dataclass(frozen=True)
class EdgeLimits:
    """The edge's limits, from the service's settings (`body_limit`, `request_deadline_s`, `edge`)."""

    max_bytes: int = 64 * 1024
    deadline_s: float = 600.0
    retry_after_s: float = 5.0
    max_header_bytes: int = 16 * 2**10
    body_allowance_s: float = 10.0
    min_body_bytes_per_s: int = 256 * 2**10
    max_requests: Optional[int] = None  # None: as many as Serve sends

    @property
    def body(self) -> BodyLimits:
        return BodyLimits(self.max_bytes, self.body_allowance_s, self.min_body_bytes_per_s)


def loggable_id(given: str) -> str:
    return _UNSAFE_IN_ID.sub("_", given)[:128]


def route_path(scope: Scope) -> str:
    """The path below the application's route prefix (Serve passes it in `root_path`)."""
    path, root = scope.get("path", ""), scope.get("root_path", "").rstrip("/")
    return path[len(root):] if root and path.startswith(root) else path


async def answer(send: Send, status: int, detail: str, retry_after: Optional[float] = None,
                 headers: Optional[dict[str, str]] = None, close: bool = False) -> None:
    """A `{"detail": ...}` answer from outside FastAPI. `close`: the request's body was not read
    to its end, so the connection cannot carry another request."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        raw.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class HttpEdge:
    """ASGI middleware: request ids, header, admission and body limits (see the module docstring)."""

    def __init__(self, app, limit: EdgeLimits, gate: Optional[Gate] = None,
                 takes_body: Optional[Callable[[Scope], bool]] = None) -> None:
        self.app = app
        self.limit = limit
        self.gate = gate
        self.takes_body = takes_body  # None: every request of a method with a body has one
        self.in_flight = 0  # requests of this replica past admission; one event loop, no lock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[bytes, bytes] = {}
        for name, value in scope.get("headers", []):
            headers.setdefault(name, value)  # the first of repeated headers, as Starlette reads them
        given = headers.get(REQUEST_ID_HEADER.encode())
        request_id = loggable_id(given.decode("latin-1")) if given else uuid.uuid4().hex
        scope[SCOPE_KEY] = request_id  # for handlers that run outside this middleware (500s)
        token = request_id_var.set(request_id)
        # Where a proxy set the id it also returns it: a second header would repeat it.
        ours = [(REQUEST_ID_HEADER.encode(), request_id.encode())] if not given else []

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                message = {**message, "headers": kept + ours}
            await send(message)

        try:
            header_bytes = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))
            if header_bytes > self.limit.max_header_bytes:
                return await answer(send_with_id, 431, f"the request's headers are {header_bytes} bytes; the "
                                    f"service takes at most {self.limit.max_header_bytes}", close=True)
            if scope["method"] == "GET" and route_path(scope) in PROBES:
                return await self._within_deadline(scope, receive, send_with_id)
            limit = self.limit.max_requests
            if limit is not None and self.in_flight >= limit:
                return await answer(send_with_id, 503, f"this Ingress replica is serving its {limit} requests "
                                    "at once; retry after Retry-After", retry_after=self.limit.retry_after_s,
                                    close=scope["method"] not in _BODILESS)
            self.in_flight += 1
            try:
                await self._admitted(scope, headers, receive, send_with_id)
            finally:
                self.in_flight -= 1
        finally:
            request_id_var.reset(token)

    async def _admitted(self, scope: Scope, headers: dict[bytes, bytes], receive: Receive, send: Send) -> None:
        if scope["method"] not in _BODILESS:
            if self.gate is not None:
                try:
                    self.gate(scope)
                except ServiceError as refused:
                    return await answer(send, refused.status_code, refused.detail, headers=refused.headers,
                                        close=True)
            if self.takes_body is not None and not self.takes_body(scope):
                # No route takes this method here: the app answers 404 or 405 without the body,
                # which is neither read nor held.
                return await self._within_deadline(scope, receive, send)
            body = await read_body(headers, receive, self.limit.body)
            if body is None:
                return
            if isinstance(body, Refusal):
                return await answer(send, body.status, body.detail, close=body.close)
            content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
            problem = json_problem(body) if "json" in content_type else None
            if problem:
                return await answer(send, 422, problem)
            receive = replay(body, receive)
        await self._within_deadline(scope, receive, send)

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
                await answer(send, 503, f"the request took longer than {self.limit.deadline_s:g} s and was "
                                        "stopped; retry later, or with fewer prompts",
                             retry_after=self.limit.retry_after_s)
