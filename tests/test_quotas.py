"""Per-key quotas in the store (deployments/flow/slots.py, subjects.py), on the local store and on
S3 (moto on loopback), raced from many threads as many Ingress replicas would: never one holder
over the limit, a freed place is taken again, and a subject released while its anchors were
still being stored leaves nothing behind."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from deployments.artifact_store import ArtifactStore
from deployments.flow.retention import ORPHAN_CLAIM_S, RetentionSettings, collect
from deployments.flow.slots import claim_slot, held_slots, release_slot
from deployments.flow.subjects import (
    OverQuota,
    SubjectRecord,
    claim_subject,
    delete_subject,
    new_subject_id,
    owned_subject_ids,
    quota_prefix,
    record_key,
    release_subject,
    save_record,
    subject_prefix,
)
from s3_server import aws_dummy_credentials, each_store, s3_bucket, s3_endpoint  # noqa: F401

RACERS = 24


@pytest.fixture
def store(each_store: ArtifactStore) -> ArtifactStore:
    return each_store


def _race(work, n: int = RACERS) -> list:
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda i: work(i), range(n)))


def _claim(store: ArtifactStore, owner: str, limit: int):
    def one(_: int):
        subject_id = new_subject_id()
        try:
            claim_subject(store, owner, subject_id, limit)
            return subject_id
        except OverQuota as error:
            return error
    return one


def _record(subject_id: str, owner: str) -> SubjectRecord:
    return SubjectRecord(subject_id=subject_id, subjects=["cat"], prompts=["a cat"], seeds=[0], config={},
                         model="preset:tiny:0", created_at=time.time(), cache_key="k", cache_nbytes=0, owner=owner)


def test_parallel_claims_never_pass_the_limit(store: ArtifactStore) -> None:
    results = _race(_claim(store, "alice", 3))
    won = [r for r in results if isinstance(r, str)]
    assert len(won) == 3 and sorted(owned_subject_ids(store, "alice")) == sorted(won)
    refused = [r for r in results if isinstance(r, OverQuota)]
    assert len(refused) == RACERS - 3
    assert "limit is 3" in str(refused[0]) and "DELETE /v1/subjects" in str(refused[0])
    assert sorted(s.holder for s in held_slots(store, quota_prefix("alice"))) == sorted(won)


def test_a_deleted_or_released_subject_frees_its_place_once(store: ArtifactStore) -> None:
    first, second = _claim(store, "bob", 2)(0), _claim(store, "bob", 2)(1)
    save_record(store, _record(first, "bob"))
    assert isinstance(_claim(store, "bob", 2)(2), OverQuota)
    delete_subject(store, first)
    third = _claim(store, "bob", 2)(3)
    assert isinstance(third, str)
    release_subject(store, "bob", second)
    release_subject(store, "bob", second)  # twice: must not free the place `third` holds
    results = _race(_claim(store, "bob", 2), 8)
    assert len([r for r in results if isinstance(r, str)]) == 1
    assert len(held_slots(store, quota_prefix("bob"))) == 2


def test_a_lowered_limit_refuses_until_enough_are_gone(store: ArtifactStore) -> None:
    made = [_claim(store, "carol", 4)(i) for i in range(4)]
    assert all(isinstance(m, str) for m in made)
    assert isinstance(_claim(store, "carol", 2)(9), OverQuota)


def test_places_are_numbered_so_that_one_never_shadows_another(store: ArtifactStore) -> None:
    holders = [claim_slot(store, "p/", 12, f"h{i}") for i in range(12)]
    assert sorted(holders) == list(range(12))
    release_slot(store, "p/", 1, "h-other")  # not its holder: nothing happens
    assert len(held_slots(store, "p/")) == 12
    release_slot(store, "p/", 1, f"h{holders.index(1)}")
    assert len(held_slots(store, "p/")) == 11  # place 1 only, not 10 and 11 with it


def test_a_record_stored_after_its_subject_was_released_is_removed(store: ArtifactStore) -> None:
    """Anchors still being stored by a model replica when their story was cancelled."""
    subject_id = new_subject_id()
    claim_subject(store, "dan", subject_id, 5)
    store.put(f"{subject_prefix(subject_id)}anchor_cache.safetensors", b"cache", "application/octet-stream")
    release_subject(store, "dan", subject_id)
    store.put(f"{subject_prefix(subject_id)}anchor_cache.safetensors", b"cache", "application/octet-stream")
    assert save_record(store, _record(subject_id, "dan")) is False
    assert list(store.list_prefix(subject_prefix(subject_id))) == [] and not store.exists(record_key(subject_id))
    kept = new_subject_id()
    assert save_record(store, _record(kept, "dan")) is True and store.exists(record_key(kept))


def test_orphan_places_are_freed_by_the_collector(store: ArtifactStore) -> None:
    """A request that died between taking a place and indexing its subject, or after both."""
    claim_slot(store, quota_prefix("erin"), 3, new_subject_id())
    claim_subject(store, "erin", new_subject_id(), 3)
    assert collect(store, RetentionSettings(), now=time.time() + 60).orphan_claims == 0
    done = collect(store, RetentionSettings(), now=time.time() + ORPHAN_CLAIM_S + 60)
    assert done.orphan_claims == 2 and held_slots(store, quota_prefix("erin")) == []
