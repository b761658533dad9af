"""The service's own error: what a request is answered with when it cannot be served.

Raised anywhere below the routes (checks, the story flow, remote calls, jobs) without any HTTP
library; the edge turns it into the answer `{"detail": ...}` with its status and headers, and a
job records its status and detail. `detail` is one sentence a person can act on.
"""

from __future__ import annotations

import math
from typing import Optional

from .request_ids import current_request_id


class ServiceError(Exception):
    def __init__(self, status_code: int, detail: str, retry_after_s: Optional[float] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = dict(headers or {})
        if retry_after_s is not None:
            # Whole seconds, at least 1: a Retry-After of 0 invites a client to hammer.
            self.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))

    def __repr__(self) -> str:
        return f"ServiceError({self.status_code}, {self.detail!r})"


class NotNow(Exception):
    """A model replica's "not now" (a cache another replica is still rebuilding, say): answered
    503 with Retry-After, its message as the detail, since it names nothing internal."""


def unprocessable(detail: str) -> ServiceError:
    return ServiceError(422, detail)


def too_large(detail: str) -> ServiceError:
    return ServiceError(413, detail)


def not_found(detail: str) -> ServiceError:
    return ServiceError(404, detail)


def unavailable(detail: str, retry_after_s: float) -> ServiceError:
    return ServiceError(503, detail, retry_after_s)


def store_unavailable(retry_after_s: float) -> ServiceError:
    """The artifact store failed (full disk, refused write, unreachable bucket): a generic detail,
    never the store's own message (paths, bucket names), and the id to find it in the logs."""
    return unavailable(f"the artifact store is unavailable; retry later (request id {current_request_id()})",
                       retry_after_s)
