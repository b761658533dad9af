"""Presigned GET URLs: a client fetches an artifact from the bucket itself, with no credentials."""

from __future__ import annotations

from typing import Any

__all__ = ["check_expiry", "presigned_get_url"]

# SigV4 presigned URLs are valid for at most 7 days.
_MAX_PRESIGN_EXPIRES_S = 7 * 24 * 3600


def check_expiry(expires_s: int) -> int:
    """``expires_s`` as an int, or ValueError outside what SigV4 can sign."""
    if not 1 <= int(expires_s) <= _MAX_PRESIGN_EXPIRES_S:
        raise ValueError(
            f"expires_s must be between 1 and {_MAX_PRESIGN_EXPIRES_S} (7 days), got {expires_s}"
        )
    return int(expires_s)


def presigned_get_url(client: Any, bucket: str, object_key: str, expires_s: int) -> str:
    return client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": object_key}, ExpiresIn=expires_s
    )
