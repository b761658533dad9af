"""Choosing and building the artifact store from settings and the environment."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import requests

from deployments.artifact_store import LocalArtifactStore, S3ArtifactStore, artifact_store_from_config
from s3_server import aws_dummy_credentials, s3_bucket, s3_endpoint  # noqa: F401


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, aws_dummy_credentials: None) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("CONSISTORY_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    return monkeypatch


def test_config_default_is_local_artifacts_dir(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.chdir(tmp_path)
    store = artifact_store_from_config(None)
    assert isinstance(store, LocalArtifactStore)
    assert store.root == (tmp_path / "artifacts").resolve()
    assert store.root.is_absolute()


def test_config_local_from_settings_and_env(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    store = artifact_store_from_config({"kind": "local", "root": str(tmp_path / "from-settings")})
    assert isinstance(store, LocalArtifactStore) and store.root == tmp_path / "from-settings"

    clean_env.setenv("CONSISTORY_STORE_ROOT", str(tmp_path / "from-env"))
    store = artifact_store_from_config({"kind": "local", "root": str(tmp_path / "from-settings")})
    assert store.root == tmp_path / "from-env"


def test_config_s3_from_env(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("CONSISTORY_STORE", "s3")
    clean_env.setenv("CONSISTORY_S3_BUCKET", "my-bucket")
    clean_env.setenv("CONSISTORY_S3_PREFIX", "prod/")
    clean_env.setenv("CONSISTORY_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    clean_env.setenv("CONSISTORY_S3_REGION", "eu-west-1")
    store = artifact_store_from_config({"kind": "local", "root": str(tmp_path)})
    assert isinstance(store, S3ArtifactStore)
    assert (store.bucket, store.prefix, store.endpoint_url, store.region) == (
        "my-bucket",
        "prod/",
        "http://127.0.0.1:9",
        "eu-west-1",
    )
    assert store.client.meta.region_name == "eu-west-1"


def test_config_s3_from_settings_with_region_fallback(clean_env: pytest.MonkeyPatch) -> None:
    settings = {"kind": "s3", "bucket": "b", "prefix": "p"}
    clean_env.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert artifact_store_from_config(settings).region == "ap-south-1"
    clean_env.setenv("AWS_REGION", "us-west-2")
    store = artifact_store_from_config(settings)
    assert (store.bucket, store.prefix, store.endpoint_url, store.region) == ("b", "p/", None, "us-west-2")
    assert artifact_store_from_config({**settings, "region": "eu-north-1"}).region == "eu-north-1"


def test_config_s3_without_bucket_names_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CONSISTORY_STORE", "s3")
    with pytest.raises(ValueError, match="CONSISTORY_S3_BUCKET"):
        artifact_store_from_config(None)


def test_config_rejects_unknown_kind_and_settings(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="'gcs'"):
        artifact_store_from_config({"kind": "gcs"})
    with pytest.raises(ValueError, match="bucket_name"):
        artifact_store_from_config({"kind": "s3", "bucket_name": "b"})


def test_config_s3_store_works_end_to_end(
    clean_env: pytest.MonkeyPatch, s3_endpoint: str, s3_bucket: str
) -> None:
    clean_env.setenv("CONSISTORY_STORE", "s3")
    clean_env.setenv("CONSISTORY_S3_BUCKET", s3_bucket)
    clean_env.setenv("CONSISTORY_S3_ENDPOINT_URL", s3_endpoint)
    clean_env.setenv("CONSISTORY_S3_PREFIX", f"cfg-{uuid.uuid4().hex[:8]}")
    store = artifact_store_from_config(None)
    store.put("subjects/s1/record.json", b'{"ok": true}', "application/json")
    assert store.get("subjects/s1/record.json") == b'{"ok": true}'
    assert requests.get(store.url("subjects/s1/record.json"), timeout=10).content == b'{"ok": true}'
