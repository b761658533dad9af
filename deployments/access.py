"""Who may call the v1 API, and how often: the FastAPI dependency every v1 route takes.

- Auth off (`auth.enabled: false`, the laptop config): every caller is `OPEN` and sees everything.
- Auth on: a request without a valid `Authorization: Bearer <token>` gets 401 with
  `WWW-Authenticate: Bearer`. A key over its `requests_per_minute` gets 429 with Retry-After.
  Subjects, their images and jobs belong to the key that made them; another key gets the same
  404 as for something that does not exist.

The rate is a token bucket per key holding a minute's worth of requests, kept by each Ingress
replica: with N Ingress replicas behind a load balancer a key can make up to N times its rate.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable, Optional

from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .api_keys import OPEN, AuthSettings, Caller, KeyRing

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
    """Configured by the Ingress when it starts (from its settings) and kept on the app's state:
    Serve ships the Ingress class and its app to the replica by value, so a module-level object
    would not be the one the routes' dependency reads."""

    def __init__(self) -> None:
        self.enabled = False
        self.keys = KeyRing([])
        self.limiter = RateLimiter()

    def configure(self, auth: AuthSettings) -> None:
        self.keys = KeyRing.from_settings(auth)
        self.enabled = auth.enabled

    def caller(self, token: Optional[str]) -> Caller:
        if not self.enabled:
            return OPEN
        key = self.keys.identify(token) if token else None
        if key is None:
            raise HTTPException(
                status_code=401,
                detail="missing or unknown API key; send Authorization: Bearer <key> with a key from the operator",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if key.requests_per_minute is not None:
            wait = self.limiter.take(key.name, key.requests_per_minute)
            if wait > 0:
                raise HTTPException(
                    status_code=429,
                    detail=f"API key {key.name!r} is over its {key.requests_per_minute:g} requests per minute; "
                    f"retry in {math.ceil(wait)} s",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        return Caller(name=key.name, admin=key.admin, key=key)


async def current_caller(request: Request,
                         credentials: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> Caller:
    access: Access = request.app.state.access
    return access.caller(credentials.credentials if credentials is not None else None)
