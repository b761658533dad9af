"""Who may call the v1 API, and how often: the FastAPI dependency every v1 route takes.

- Auth off (no key configured, the laptop config): every caller is `OPEN` and sees everything.
- Auth on: a request without a valid `Authorization: Bearer <token>` gets 401 with
  `WWW-Authenticate: Bearer`. A key over its `requests_per_minute` gets 429 with Retry-After.
  Subjects, their images and jobs belong to the key that made them; another key gets the same
  404 as for something that does not exist.

The rate is a token bucket per key holding a minute's worth of requests, kept by each Ingress
replica: with N Ingress replicas behind a load balancer a key can make up to N times its rate.

A v1 request with a body is checked by `Access.gate` before its body is read (the edge calls it),
so that a client without a key is answered 401 at once instead of holding a slot while it sends
a body; the caller found then is kept on the request, and the route's dependency uses it rather
than counting the request against the key's rate a second time.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable, Optional

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..errors import ServiceError
from ..flow.image_links import ARTIFACTS
from .api_keys import OPEN, AuthSettings, Caller, KeyRing
from .http_edge import Scope, route_path

CALLER = "consistory.caller"  # the scope key of the caller `Access.gate` found

bearer = HTTPBearer(
    auto_error=False,
    description="An API key from the operator: `Authorization: Bearer <key>`. Not needed when the "
    "service runs with auth off (the laptop config).",
)


class RateLimiter:
    """Token buckets by key name: `per_minute` tokens at most, refilled continuously."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, name: str, per_minute: float) -> float:
        """0 if a request may go now (and counts it), else the seconds until it may."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(name, (per_minute, now))
            tokens = min(per_minute, tokens + (now - at) * per_minute / 60.0)
            if tokens >= 1.0:
                self._buckets[name] = (tokens - 1.0, now)
                return 0.0
            self._buckets[name] = (tokens, now)
            return (1.0 - tokens) * 60.0 / per_minute


class Access:
    """The keys and rate limits of one Ingress replica, made from its settings and kept on its
    app's state, where `current_caller` finds them."""

    def __init__(self, auth: AuthSettings) -> None:
        self.keys = KeyRing.from_settings(auth)
        self.enabled = auth.on(bool(self.keys.keys))  # any key configured means keys are needed
        self.limiter = RateLimiter()

    def caller(self, token: Optional[str]) -> Caller:
        if not self.enabled:
            return OPEN
        key = self.keys.identify(token) if token else None
        if key is None:
            raise ServiceError(
                401, "missing or unknown API key; send Authorization: Bearer <key> with a key from the operator",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if key.requests_per_minute is not None:
            wait = self.limiter.take(key.name, key.requests_per_minute)
            if wait > 0:
                raise ServiceError(
                    429, f"API key {key.name!r} is over its {key.requests_per_minute:g} requests per minute; "
                    f"retry in {math.ceil(wait)} s", retry_after_s=wait,
                )
        return Caller(name=key.name, admin=key.admin, key=key)

    def gate(self, scope: Scope) -> None:
        """Before a v1 request's body is read: its caller, or the 401 or 429 it gets. Image URLs
        need no key (their signature is the permission)."""
        path = route_path(scope)
        if self.enabled and path.startswith("/v1/") and not path.startswith(ARTIFACTS + "/"):
            scope[CALLER] = self.caller(bearer_token(scope))


def bearer_token(scope: Scope) -> Optional[str]:
    """The token of `Authorization: Bearer <token>`, read as FastAPI's HTTPBearer reads it."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


async def current_caller(request: Request,
                         credentials: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> Caller:
    known = request.scope.get(CALLER)
    if known is not None:
        return known
    access: Access = request.app.state.services.access
    return access.caller(credentials.credentials if credentials is not None else None)
