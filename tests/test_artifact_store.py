"""The artifact store: one behaviour suite for the local directory and for S3 (moto on loopback)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import requests

from deployments.artifact_store import (
    ArtifactNotFound,
    ArtifactStore,
    ArtifactStoreError,
    LocalArtifactStore,
    S3ArtifactStore,
    artifact_store_from_config,
)
from s3_server import aws_dummy_credentials, s3_bucket, s3_client, s3_endpoint  # noqa: F401

# Every byte value, NULs and invalid UTF-8 included.
BINARY = bytes(range(256)) * 64 + b"\x00\xff\x89PNG\r\n\x1a\n"

BAD_KEYS = [
    ("", "empty"),
    ("/etc/passwd", "absolute"),
    ("subjects/../../escape.png", "'..'"),
    ("..", "'..'"),
    ("subjects\\abc\\x.png", "backslash"),
    ("subjects//x.png", "empty"),
]


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


# ---- behaviour shared by every implementation ----


def test_put_get_round_trip_binary(store: ArtifactStore) -> None:
    store.put("subjects/s1/anchor_0.png", BINARY, "image/png")
    assert store.get("subjects/s1/anchor_0.png") == BINARY
    store.put("subjects/s1/empty.bin", b"", "application/octet-stream")
    assert store.get("subjects/s1/empty.bin") == b""


def test_put_parts_and_get_buffer_round_trip(store: ArtifactStore) -> None:
    import numpy as np

    parts = [b"header", np.frombuffer(BINARY, dtype=np.uint8), memoryview(BINARY[:1000]), b""]
    store.put_parts("subjects/s1/anchor_cache.safetensors", parts, "application/octet-stream")
    expected = b"header" + BINARY + BINARY[:1000]
    assert store.get("subjects/s1/anchor_cache.safetensors") == expected
    assert bytes(memoryview(store.get_buffer("subjects/s1/anchor_cache.safetensors"))) == expected
    with pytest.raises(ArtifactNotFound):
        store.get_buffer("subjects/nope/anchor_cache.safetensors")


def test_exists(store: ArtifactStore) -> None:
    assert not store.exists("subjects/s1/record.json")
    store.put("subjects/s1/record.json", b"{}", "application/json")
    assert store.exists("subjects/s1/record.json")
    assert not store.exists("subjects/s1")  # a "directory" is not an artifact


def test_overwrite_replaces_content(store: ArtifactStore) -> None:
    store.put("a/b.bin", b"first, longer content", "application/octet-stream")
    store.put("a/b.bin", b"second", "application/octet-stream")
    assert store.get("a/b.bin") == b"second"


def test_get_missing_raises_artifact_not_found(store: ArtifactStore) -> None:
    with pytest.raises(ArtifactNotFound) as info:
        store.get("subjects/nope/anchor_0.png")
    assert isinstance(info.value, KeyError)
    assert info.value.key == "subjects/nope/anchor_0.png"
    assert str(info.value) == "no artifact stored under key 'subjects/nope/anchor_0.png'"


def test_delete_prefix_removes_only_that_prefix(store: ArtifactStore) -> None:
    doomed = ["subjects/a/anchor_0.png", "subjects/a/anchor_1.png", "subjects/a/cache/anchor.safetensors"]
    kept = ["subjects/ab/anchor_0.png", "subjects/b/anchor_0.png", "images/a/0.png"]
    for key in doomed + kept:
        store.put(key, key.encode(), "application/octet-stream")

    assert store.delete_prefix("subjects/a/") == len(doomed)
    assert not any(store.exists(key) for key in doomed)
    assert all(store.get(key) == key.encode() for key in kept)
    assert store.delete_prefix("subjects/a/") == 0
    assert store.delete_prefix("nothing/here/") == 0


def test_delete_prefix_is_a_string_prefix(store: ArtifactStore) -> None:
    for key in ["runs/r1/x", "runs/r10/y", "runs/r2/z"]:
        store.put(key, b"1", "text/plain")
    assert store.delete_prefix("runs/r1") == 2
    assert store.exists("runs/r2/z")


@pytest.mark.parametrize("key, problem", BAD_KEYS)
def test_bad_keys_raise_value_error(store: ArtifactStore, key: str, problem: str) -> None:
    for call in (
        lambda: store.put(key, b"x", "text/plain"),
        lambda: store.get(key),
        lambda: store.exists(key),
        lambda: store.url(key),
    ):
        with pytest.raises(ValueError, match=problem):
            call()


@pytest.mark.parametrize("prefix", ["", "/", "../", "a/../"])
def test_delete_prefix_refuses_bad_or_empty_prefix(store: ArtifactStore, prefix: str) -> None:
    store.put("keep/me.txt", b"1", "text/plain")
    with pytest.raises(ValueError):
        store.delete_prefix(prefix)
    assert store.exists("keep/me.txt")


def test_describe_says_where(store: ArtifactStore) -> None:
    text = store.describe()
    assert text and "\n" not in text
    if isinstance(store, S3ArtifactStore):
        assert f"s3://{store.bucket}/{store.prefix}" in text
    else:
        assert str(store.root) in text


# ---- local directory ----


def test_local_url_is_the_service_route(tmp_path: Path) -> None:
    assert LocalArtifactStore(tmp_path).url("subjects/s1/anchor_0.png") == "/v1/artifacts/subjects/s1/anchor_0.png"
    custom = LocalArtifactStore(tmp_path, url_prefix="/files/")
    assert custom.url("a/b.png", expires_s=5) == "/files/a/b.png"


def test_local_path_lies_under_root(local_store: LocalArtifactStore) -> None:
    local_store.put("subjects/s1/anchor_0.png", b"png", "image/png")
    path = local_store.path("subjects/s1/anchor_0.png")
    assert path == local_store.root / "subjects" / "s1" / "anchor_0.png"
    assert path.read_bytes() == b"png"
    assert local_store.root.is_absolute()


def _all_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_local_write_leaves_no_temp_files(local_store: LocalArtifactStore) -> None:
    for i in range(5):
        local_store.put("subjects/s1/anchor_0.png", BINARY[: 100 * i], "image/png")
        local_store.put(f"subjects/s1/img_{i}.png", b"x", "image/png")
    expected = {"subjects/s1/anchor_0.png"} | {f"subjects/s1/img_{i}.png" for i in range(5)}
    assert _all_files(local_store.root) == expected


def test_local_failed_write_keeps_old_content_and_no_temp_file(
    local_store: LocalArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    local_store.put("subjects/s1/record.json", b'{"v": 1}', "application/json")

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(ArtifactStoreError, match="No space left"):
        local_store.put("subjects/s1/record.json", b'{"v": 2, "half": "writ', "application/json")
    monkeypatch.undo()

    assert local_store.get("subjects/s1/record.json") == b'{"v": 1}'
    assert _all_files(local_store.root) == {"subjects/s1/record.json"}


def test_local_key_cannot_escape_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    store = LocalArtifactStore(root)
    (root / "linked").symlink_to(outside, target_is_directory=True)

    for key in ["../outside/x.png", "linked/x.png", "subjects/../../outside/x.png"]:
        with pytest.raises(ValueError):
            store.put(key, b"evil", "image/png")
    assert list(outside.iterdir()) == []
    assert store.delete_prefix("linked/") == 0


def test_local_delete_prefix_removes_emptied_directories(local_store: LocalArtifactStore) -> None:
    local_store.put("subjects/s1/cache/anchor.safetensors", b"1", "application/octet-stream")
    local_store.put("subjects/s2/anchor_0.png", b"2", "image/png")
    assert local_store.delete_prefix("subjects/s1/") == 1
    assert not (local_store.root / "subjects" / "s1").exists()
    assert (local_store.root / "subjects" / "s2" / "anchor_0.png").is_file()


def test_local_delete_prefix_skips_writes_in_progress(local_store: LocalArtifactStore) -> None:
    local_store.put("subjects/s1/a.png", b"1", "image/png")
    partial = local_store.root / "subjects" / "s1" / ".abc123.artifact-tmp"
    partial.write_bytes(b"half")
    assert local_store.delete_prefix("subjects/s1/") == 1
    assert partial.exists()  # not an artifact yet; its writer will rename it


# ---- S3 ----


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


# ---- configuration ----


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


def test_list_prefix_gives_keys_sizes_and_times_in_order(store: ArtifactStore) -> None:
    import time

    before = time.time() - 5
    for key, size in [("subjects/abc/b.png", 3), ("subjects/abc/a.png", 1), ("subjects/abd/x.png", 2),
                      ("jobs/j1/job.json", 4)]:
        store.put(key, b"x" * size, "application/octet-stream")
    listed = list(store.list_prefix("subjects/ab"))
    assert [(a.key, a.nbytes) for a in listed] == [
        ("subjects/abc/a.png", 1), ("subjects/abc/b.png", 3), ("subjects/abd/x.png", 2)]
    assert all(before <= a.modified_at <= time.time() + 5 for a in listed)
    assert [a.key for a in store.list_prefix("subjects/abc/")] == ["subjects/abc/a.png", "subjects/abc/b.png"]
    assert list(store.list_prefix("nothing/")) == []
    with pytest.raises(ValueError):
        list(store.list_prefix("../"))
