"""The stores the artifact-store suites run against: a local directory, and S3 on the loopback
moto server (s3_server). Import the fixtures by name into a test module, with the s3_server
fixtures they need."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from deployments.artifact_store import ArtifactStore, LocalArtifactStore, S3ArtifactStore

# Every byte value, NULs and invalid UTF-8 included.
BINARY = bytes(range(256)) * 64 + b"\x00\xff\x89PNG\r\n\x1a\n"


@pytest.fixture
def local_store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def s3_store(s3_endpoint: str, s3_bucket: str, aws_dummy_credentials: None) -> S3ArtifactStore:
    # A prefix per test keeps tests on the shared bucket independent.
    return S3ArtifactStore(s3_bucket, prefix=f"t-{uuid.uuid4().hex[:8]}/", endpoint_url=s3_endpoint)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> ArtifactStore:
    return request.getfixturevalue(f"{request.param}_store")
