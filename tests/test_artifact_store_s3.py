"""The S3 artifact store on moto (loopback): presigned URLs, key prefixes, multipart transfers,
and a missing bucket told from a missing key."""

from __future__ import annotations

import os
import uuid

import pytest
import requests

from deployments.artifact_store import ArtifactNotFound, ArtifactStoreError, S3ArtifactStore
from s3_server import aws_dummy_credentials, s3_bucket, s3_client, s3_endpoint  # noqa: F401
from store_fixtures import BINARY, s3_store  # noqa: F401


def test_s3_presigned_url_serves_bytes_and_content_type(s3_store: S3ArtifactStore) -> None:
    s3_store.put("subjects/s1/anchor_0.png", BINARY, "image/png")
    url = s3_store.url("subjects/s1/anchor_0.png", expires_s=60)
    assert url.startswith(s3_store.endpoint_url)
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    assert response.content == BINARY
    assert response.headers["Content-Type"] == "image/png"


def test_s3_keys_land_under_prefix(s3_store: S3ArtifactStore, s3_endpoint: str, s3_bucket: str) -> None:
    s3_store.put("subjects/s1/anchor_0.png", b"1", "image/png")
    s3_store.put("subjects/s1/record.json", b"{}", "application/json")
    listing = s3_client(s3_endpoint).list_objects_v2(Bucket=s3_bucket, Prefix=s3_store.prefix)
    assert sorted(obj["Key"] for obj in listing["Contents"]) == [
        f"{s3_store.prefix}subjects/s1/anchor_0.png",
        f"{s3_store.prefix}subjects/s1/record.json",
    ]


def test_s3_prefix_is_normalized(s3_bucket: str, s3_endpoint: str, aws_dummy_credentials: None) -> None:
    assert S3ArtifactStore(s3_bucket, prefix="runs", endpoint_url=s3_endpoint).prefix == "runs/"
    assert S3ArtifactStore(s3_bucket, prefix="/runs/x/", endpoint_url=s3_endpoint).prefix == "runs/x/"
    assert S3ArtifactStore(s3_bucket, endpoint_url=s3_endpoint).prefix == ""
    with pytest.raises(ValueError):
        S3ArtifactStore(s3_bucket, prefix="a/../b", endpoint_url=s3_endpoint)


def test_s3_url_expiry_must_be_valid(s3_store: S3ArtifactStore) -> None:
    for bad in (0, -5, 8 * 24 * 3600):
        with pytest.raises(ValueError, match="expires_s"):
            s3_store.url("a.png", expires_s=bad)


def test_s3_large_artifact_goes_multipart_and_round_trips(
    s3_endpoint: str, s3_bucket: str, aws_dummy_credentials: None
) -> None:
    # Anchor caches (4-22 GB) exceed S3's 5 GB single-PUT cap; force the multipart path
    # with S3's minimum part size so a ~12 MiB payload is split into 3 parts.
    part = 5 * 1024 * 1024
    store = S3ArtifactStore(
        s3_bucket,
        prefix=f"mp-{uuid.uuid4().hex[:8]}/",
        endpoint_url=s3_endpoint,
        multipart_threshold=part,
        multipart_chunksize=part,
    )
    data = os.urandom(12 * 1024 * 1024 + 12345)
    store.put("subjects/s1/cache/anchor.safetensors", data, "application/octet-stream")

    head = s3_client(s3_endpoint).head_object(
        Bucket=s3_bucket, Key=f"{store.prefix}subjects/s1/cache/anchor.safetensors"
    )
    assert "-" in head["ETag"]  # "<md5 of part md5s>-<part count>": a multipart upload
    assert head["ETag"].strip('"').endswith("-3")
    assert head["ContentLength"] == len(data)
    assert head["ContentType"] == "application/octet-stream"
    assert store.get("subjects/s1/cache/anchor.safetensors") == data
    with pytest.raises(ArtifactNotFound):
        store.get("subjects/s1/cache/absent.safetensors")


def test_s3_missing_bucket_is_not_reported_as_missing_key(
    s3_endpoint: str, aws_dummy_credentials: None
) -> None:
    store = S3ArtifactStore(f"absent-{uuid.uuid4().hex[:8]}", endpoint_url=s3_endpoint)
    with pytest.raises(ArtifactStoreError, match="NoSuchBucket"):
        store.get("a.png")


def test_s3_cache_chunks_upload_multipart_and_download_into_one_buffer(
    s3_endpoint: str, s3_bucket: str, aws_dummy_credentials: None
) -> None:
    # A cache's chunks as put_parts gets them: streamed into a multipart upload without being
    # joined, and read back by ranged GETs into one preallocated buffer.
    import numpy as np

    part = 5 * 1024 * 1024
    store = S3ArtifactStore(s3_bucket, prefix=f"mp-{uuid.uuid4().hex[:8]}/", endpoint_url=s3_endpoint,
                            multipart_threshold=part, multipart_chunksize=part)
    chunks = [np.frombuffer(os.urandom(n), dtype=np.uint8) for n in (4 * 1024 * 1024, 7 * 1024 * 1024 + 3, 99)]
    store.put_parts("subjects/s1/anchor_cache.safetensors", [b"header!!"] + chunks, "application/octet-stream")
    head = s3_client(s3_endpoint).head_object(Bucket=s3_bucket, Key=f"{store.prefix}subjects/s1/anchor_cache.safetensors")
    assert head["ETag"].strip('"').endswith("-3")
    buffer = store.get_buffer("subjects/s1/anchor_cache.safetensors")
    assert isinstance(buffer, np.ndarray) and buffer.nbytes == 8 + sum(c.nbytes for c in chunks)
    assert buffer.tobytes() == b"header!!" + b"".join(c.tobytes() for c in chunks)
