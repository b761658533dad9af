"""The local-directory artifact store: its file route, its files on disk, and writes that are
all or nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deployments.artifact_store import ArtifactStoreError, LocalArtifactStore
from store_fixtures import BINARY, local_store  # noqa: F401


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
