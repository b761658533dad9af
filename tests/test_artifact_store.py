"""The artifact store: one behaviour suite for the local directory and for S3 (moto on loopback)."""

from __future__ import annotations

import pytest

from deployments.artifact_store import ArtifactNotFound, ArtifactStore, S3ArtifactStore
from s3_server import aws_dummy_credentials, s3_bucket, s3_endpoint  # noqa: F401
from store_fixtures import BINARY, local_store, s3_store, store  # noqa: F401

BAD_KEYS = [
    ("", "empty"),
    ("/etc/passwd", "absolute"),
    ("subjects/../../escape.png", "'..'"),
    ("..", "'..'"),
    ("subjects\\abc\\x.png", "backslash"),
    ("subjects//x.png", "empty"),
]


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
