"""What an S3ArtifactStore is built from: its checked arguments, the boto3 client, the
transfer settings.

S3 credentials come only from boto3's normal chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and config files, instance or pod roles).
"""

from __future__ import annotations

from typing import Any

from ..base import validate_key

__all__ = [
    "DEFAULT_MULTIPART_CHUNKSIZE",
    "DEFAULT_MULTIPART_THRESHOLD",
    "check_settings",
    "make_client",
    "make_transfer_config",
    "normalize_prefix",
]

# Transfers: a single PUT is capped at 5 GB and anchor caches run 4-22 GB, so put/get go
# through boto3's managed transfer (multipart upload, parallel ranged GETs) above a threshold.
_MIB = 1024 * 1024
DEFAULT_MULTIPART_THRESHOLD = 64 * _MIB
DEFAULT_MULTIPART_CHUNKSIZE = 64 * _MIB
_MAX_CONCURRENCY = 4


def check_settings(
    bucket: str, addressing_style: str | None, multipart_threshold: int, multipart_chunksize: int
) -> None:
    """Raise ValueError for a setting no client could work with."""
    if not bucket:
        raise ValueError("S3ArtifactStore needs a bucket name")
    if addressing_style not in (None, "auto", "path", "virtual"):
        raise ValueError(
            f"addressing_style must be 'auto', 'path' or 'virtual', got {addressing_style!r}"
        )
    if int(multipart_threshold) < 1 or int(multipart_chunksize) < 1:
        raise ValueError(
            "multipart_threshold and multipart_chunksize must be positive, got "
            f"{multipart_threshold!r} and {multipart_chunksize!r}"
        )


def normalize_prefix(prefix: str) -> str:
    """``"runs"`` and ``"/runs/"`` -> ``"runs/"``; ``""`` stays ``""``."""
    prefix = prefix.strip("/")
    if not prefix:
        return ""
    validate_key(prefix)
    return prefix + "/"


def make_client(endpoint_url: str | None, region: str | None, addressing_style: str | None) -> Any:
    """A boto3 S3 client with credentials from boto3's default chain."""
    import boto3
    from botocore.config import Config

    # S3-compatible servers behind a plain host name rarely resolve
    # "<bucket>.<host>", so path-style is the safe default for them.
    style = addressing_style or ("path" if endpoint_url else None)
    config = Config(
        # SigV4 for presigned URLs too: botocore may otherwise presign with SigV2,
        # which regions opened since 2014 (and many S3-compatible servers) refuse.
        signature_version="s3v4",
        retries={"mode": "standard", "max_attempts": 5},
        s3={"addressing_style": style} if style else None,
    )
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def make_transfer_config(multipart_threshold: int, multipart_chunksize: int) -> Any:
    """When put and get switch to multipart uploads and ranged GETs, and in what part size."""
    from boto3.s3.transfer import TransferConfig

    # S3 needs parts of at least 5 MiB (but the last); s3transfer raises smaller
    # chunk sizes to that minimum and caps the part count at 10,000 by itself.
    return TransferConfig(
        multipart_threshold=int(multipart_threshold),
        multipart_chunksize=int(multipart_chunksize),
        max_concurrency=_MAX_CONCURRENCY,
        use_threads=True,
    )
