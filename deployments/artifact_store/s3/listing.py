"""Listing and deleting every object under a key prefix, page by page."""

from __future__ import annotations

from typing import Any, Iterator

from botocore.exceptions import BotoCoreError, ClientError

from ..base import ArtifactStoreError, StoredArtifact

__all__ = ["delete_objects", "list_objects"]

# S3 DeleteObjects accepts at most 1000 keys per call.
_DELETE_BATCH = 1000


def _objects(client: Any, bucket: str, object_prefix: str) -> Iterator[dict[str, Any]]:
    """The ListObjectsV2 entries under ``object_prefix``, in key order, one page at a time."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=object_prefix):
        yield from page.get("Contents", [])


def list_objects(client: Any, bucket: str, store_prefix: str, prefix: str) -> Iterator[StoredArtifact]:
    """The artifacts under ``prefix``, keyed without the store's own ``store_prefix``."""
    try:
        for obj in _objects(client, bucket, store_prefix + prefix):
            yield StoredArtifact(obj["Key"][len(store_prefix):], obj["Size"], obj["LastModified"].timestamp())
    except (BotoCoreError, ClientError) as error:
        raise ArtifactStoreError(f"could not list s3://{bucket}/{store_prefix}{prefix}: {error}") from error


def delete_objects(client: Any, bucket: str, object_prefix: str) -> int:
    """Delete every object whose key starts with ``object_prefix``; returns how many."""
    removed = 0
    batch: list[dict[str, str]] = []
    for obj in _objects(client, bucket, object_prefix):
        batch.append({"Key": obj["Key"]})
        if len(batch) == _DELETE_BATCH:
            removed += _delete_batch(client, bucket, batch)
            batch = []
    if batch:
        removed += _delete_batch(client, bucket, batch)
    return removed


def _delete_batch(client: Any, bucket: str, batch: list[dict[str, str]]) -> int:
    response = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    errors = response.get("Errors", [])
    if errors:
        first = errors[0]
        raise ArtifactStoreError(
            f"S3 refused to delete {len(errors)} of {len(batch)} objects in bucket "
            f"{bucket!r}; first: {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
        )
    return len(batch)
