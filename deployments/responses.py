"""The error answers each route can give, as OpenAPI documents them (so generated clients know
them), and the helpers that make them. Every error body is `{"detail": "<one sentence>"}`."""

from __future__ import annotations

import math
from typing import Any

from fastapi import HTTPException

from .http_edge import current_request_id
from .schemas import ErrorOut

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}

ERRORS: dict[int, dict[str, Any]] = {
    401: {
        "description": "No API key, or an unknown one: send `Authorization: Bearer <key>`.",
        "headers": {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    },
    403: {"description": "The image URL's signature is wrong or has expired; ask for the image again."},
    404: {"description": "No such subject, job or image (never made, deleted, past its retention, or another key's)."},
    409: {"description": "The subject was made with another model than the one this service runs."},
    413: {"description": "The request body is larger than the service accepts."},
    422: {"description": "The request is invalid; `detail` names the field and how to fix it."},
    429: {
        "description": "The API key is over its request rate or its number of subjects.",
        "headers": _RETRY_AFTER,
    },
    503: {
        "description": "At capacity, a worker was lost, or the artifact store failed; retry after Retry-After.",
        "headers": _RETRY_AFTER,
    },
}


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that can answer these error codes."""
    return {code: {"model": ErrorOut, **ERRORS[code]} for code in codes}


def unavailable(detail: str, retry_after_s: float) -> HTTPException:
    return HTTPException(
        status_code=503, detail=detail, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))}
    )


def store_unavailable(retry_after_s: float) -> HTTPException:
    """The artifact store failed (full disk, refused write, unreachable bucket): a generic detail,
    never the store's own message (paths, bucket names), and the id to find it in the logs."""
    return unavailable(
        f"the artifact store is unavailable; retry later (request id {current_request_id()})", retry_after_s
    )
