"""Create-if-absent and the rebuild lease built on it, on the local directory and on S3 (moto on
loopback): of many replicas that find a subject's cache lost at once, one rebuilds it."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import pytest

from deployments.artifact_store import ArtifactStore
from deployments.subjects import (
    acquire_rebuild_lease,
    lease_key,
    new_subject_id,
    rebuild_lease_held,
    release_rebuild_lease,
)
from s3_server import aws_dummy_credentials, each_store, s3_bucket, s3_endpoint  # noqa: F401

CONTENDERS = 8


@pytest.fixture
def store(each_store: ArtifactStore) -> ArtifactStore:
    return each_store


def _all_at_once(count: int, work):
    """Runs `work(i)` on `count` threads released together; their results in order."""
    start = threading.Barrier(count)

    def run(i: int):
        start.wait()
        return work(i)

    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count)))


def test_create_exclusive_has_one_winner_and_keeps_its_bytes(store: ArtifactStore) -> None:
    won = _all_at_once(CONTENDERS, lambda i: store.create_exclusive("k/lease", f"owner {i}".encode(), "text/plain"))
    assert won.count(True) == 1
    assert store.get("k/lease") == f"owner {won.index(True)}".encode()
    assert store.create_exclusive("k/lease", b"late", "text/plain") is False
    assert store.get("k/lease") == f"owner {won.index(True)}".encode()


def test_one_replica_of_many_gets_the_lease_until_it_releases_it(store: ArtifactStore) -> None:
    subject = new_subject_id()
    won = _all_at_once(CONTENDERS, lambda i: acquire_rebuild_lease(store, subject, f"replica-{i}", ttl_s=60))
    assert won.count(True) == 1
    assert rebuild_lease_held(store, subject)
    assert json.loads(store.get(lease_key(subject)))["owner"] == f"replica-{won.index(True)}"
    assert not acquire_rebuild_lease(store, subject, "latecomer", ttl_s=60)
    release_rebuild_lease(store, subject)
    assert not rebuild_lease_held(store, subject)
    assert acquire_rebuild_lease(store, subject, "next", ttl_s=60)


def test_the_lease_of_a_dead_holder_is_taken_over_after_it_expires(store: ArtifactStore) -> None:
    subject = new_subject_id()
    assert acquire_rebuild_lease(store, subject, "died", ttl_s=0.2)
    assert not acquire_rebuild_lease(store, subject, "waiting", ttl_s=60)
    time.sleep(0.4)
    assert acquire_rebuild_lease(store, subject, "waiting", ttl_s=60)
    assert json.loads(store.get(lease_key(subject)))["owner"] == "waiting"


def test_an_unreadable_lease_does_not_block_rebuilds_forever(store: ArtifactStore) -> None:
    subject = new_subject_id()
    store.put(lease_key(subject), b"\x00 not json", "application/json")
    assert acquire_rebuild_lease(store, subject, "replica", ttl_s=60)
