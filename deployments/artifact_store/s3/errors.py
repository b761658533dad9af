"""Reading S3's error answers: a missing key, a lost conditional write, or a store failure."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from ..base import store_errors

__all__ = ["is_not_found", "is_write_conflict", "s3_store_errors"]

# A store method's own failures leave it as ArtifactStoreError: botocore's errors, S3's
# error answers, and the socket and buffer errors a transfer can raise.
s3_store_errors = store_errors(BotoCoreError, ClientError, OSError)


def _error_code(err: Exception) -> str:
    return str((getattr(err, "response", None) or {}).get("Error", {}).get("Code", ""))


def is_not_found(err: Exception) -> bool:
    """Whether S3 answered that the key does not exist."""
    # By error code, not by HTTP status: NoSuchBucket is a 404 too, and a missing
    # bucket is a configuration error, not a missing artifact. HEAD answers carry no
    # body, so botocore reports their 404 as code "404".
    return _error_code(err) in ("NoSuchKey", "404", "NotFound")


def is_write_conflict(err: Exception) -> bool:
    """Whether a conditional write (If-None-Match: *) lost to an object already there."""
    # 412 when the key exists; 409 when another conditional write to it is in flight.
    return _error_code(err) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
