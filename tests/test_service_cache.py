"""Anchor caches in the service: the compact codec, chunks read in place from the object store, a
replica LRU bounded in bytes, and caches from an older format rebuilt from their records.

One app: tiny preset, compact caches in 8 KiB chunks, one Generator replica (so every cache
load is observable in one place), an Ingress that keeps only two subjects' handles.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open
from service_helpers import (
    ANCHORS, APP, CONFIG, SUBJECTS, assert_same_pixels, create_subject, image_pixels, local_service, ok_json,
    post, replace_replicas, tiny_service_args
)
from service_helpers import library, store_root  # noqa: F401 (fixtures)

PROMPT = "a cat in the snow"
CHUNK = 8 * 1024


@pytest.fixture(scope="module")
def cache_bytes(library) -> int:
    return library.create_anchors(ANCHORS, SUBJECTS, seed=0, config=CONFIG, cache_codec="compact").cache.nbytes


@pytest.fixture(scope="module")
def service(store_root: Path, cache_bytes: int):
    args = tiny_service_args(
        {"kind": "local", "root": str(store_root)},
        generators=1,
        cache_codec="compact",
        cache_chunk_bytes=CHUNK,
        # Room for two of these caches, not three (their sizes differ by a few percent).
        cache_lru_bytes=int(2.5 * cache_bytes),
        ingress_cache_refs=2,
    )
    with local_service(args) as base_url:
        yield base_url


def _expected(library, seed: int):
    cache = library.create_anchors(ANCHORS, SUBJECTS, seed=seed, config=CONFIG, cache_codec="compact").cache
    return library.generate_from_anchors(cache, [PROMPT]).images[0]


def _create(client, service, seed: int) -> str:
    return create_subject(client, service, seed)["subject_id"]


def _image(client, service, subject_id: str):
    answer = ok_json(post(client, f"{service}/v1/subjects/{subject_id}/images", {"prompts": [PROMPT]}))
    return image_pixels(client, answer["images"][0])


def _generator_caches() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Generator", app_name=APP).cache_stats.remote().result(timeout_s=60)


def test_compact_caches_in_chunks_give_the_librarys_images(client, service, library, store_root):
    subject_id = _create(client, service, seed=11)
    record = ok_json(client.get(f"{service}/v1/subjects/{subject_id}", timeout=30))
    assert record["cache_codec"] == "compact"
    stored = store_root / "subjects" / subject_id / "anchor_cache.safetensors"
    assert record["cache_nbytes"] == stored.stat().st_size > 3 * CHUNK  # several chunks
    with safe_open(str(stored), framework="pt") as f:
        assert len(f.metadata()["chunks"]) > 3
    # The stored copy is removed: the image can only come from the object store's chunks.
    stored.unlink()
    assert_same_pixels(_image(client, service, subject_id), _expected(library, 11))
    assert not stored.exists(), "the cache was rebuilt instead of read from the object store"


def test_replica_lru_is_bounded_in_bytes(client, service, cache_bytes):
    ids = [_create(client, service, seed) for seed in (21, 22, 23)]
    for subject_id in ids:
        _image(client, service, subject_id)
    caches = _generator_caches()
    assert caches["bytes"] <= caches["budget_bytes"] == int(2.5 * cache_bytes)
    assert caches["subjects"][-2:] == ids[1:] and ids[0] not in caches["subjects"]


def test_cache_read_in_place_outlives_its_owner(client, service, library):
    subject_id = _create(client, service, seed=31)
    first = _image(client, service, subject_id)  # loaded from the owner's chunks
    replace_replicas(APP, "AnchorStage", service, expected=1)
    assert subject_id in _generator_caches()["subjects"]
    again = _image(client, service, subject_id)  # from the replica's LRU
    assert (again == first).all()
    assert_same_pixels(again, _expected(library, 31))


def test_a_version_1_cache_in_the_store_is_rebuilt_from_the_record(client, service, library, store_root):
    from safetensors.torch import save_file
    import torch

    subject_id = _create(client, service, seed=41)
    stored = store_root / "subjects" / subject_id / "anchor_cache.safetensors"
    meta = safe_open(str(stored), framework="pt").metadata()
    save_file({"shared/p1/s1/h0/up_blocks.0.attentions.0.transformer_blocks.0.attn1/k": torch.zeros(2, 64)},
              str(stored), metadata={**meta, "format_version": "1"})
    for seed in (42, 43):  # the Ingress keeps two handles: the first subject's is dropped
        _create(client, service, seed)
    assert_same_pixels(_image(client, service, subject_id), _expected(library, 41))
    with safe_open(str(stored), framework="pt") as f:
        assert f.metadata()["format_version"] == "2", "the rebuilt cache replaces the old file"
