"""Create-if-absent and the leases built on it (deployments/flow/leases.py), on the local
directory and on S3 (moto on loopback): of many replicas that find a subject's cache lost at
once, one rebuilds it; a job's runner keeps its lease by renewing it."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import pytest

from deployments.artifact_store import ArtifactStore
from deployments.flow.leases import Lease, rebuild_lease, rebuild_lease_key, runner_lease
from deployments.flow.subjects import new_subject_id
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
    won = _all_at_once(CONTENDERS, lambda i: rebuild_lease(store, subject, f"replica-{i}", ttl_s=60).acquire())
    assert won.count(True) == 1
    assert rebuild_lease(store, subject, "anyone", ttl_s=60).held()
    assert json.loads(store.get(rebuild_lease_key(subject)))["owner"] == f"replica-{won.index(True)}"
    assert not rebuild_lease(store, subject, "latecomer", ttl_s=60).acquire()
    rebuild_lease(store, subject, f"replica-{won.index(True)}", ttl_s=60).release()
    assert not rebuild_lease(store, subject, "anyone", ttl_s=60).held()
    assert rebuild_lease(store, subject, "next", ttl_s=60).acquire()


def test_the_lease_of_a_dead_holder_is_taken_over_after_it_expires(store: ArtifactStore) -> None:
    subject = new_subject_id()
    # Lifetimes of seconds, not tenths: a loaded machine (or S3) takes tenths between two calls.
    assert rebuild_lease(store, subject, "died", ttl_s=2.0).acquire()
    assert not rebuild_lease(store, subject, "waiting", ttl_s=60).acquire()
    time.sleep(2.5)
    assert rebuild_lease(store, subject, "waiting", ttl_s=60).acquire()
    assert json.loads(store.get(rebuild_lease_key(subject)))["owner"] == "waiting"


def test_an_unreadable_lease_does_not_block_rebuilds_forever(store: ArtifactStore) -> None:
    subject = new_subject_id()
    store.put(rebuild_lease_key(subject), b"\x00 not json", "application/json")
    assert rebuild_lease(store, subject, "replica", ttl_s=60).acquire()


def test_a_renewed_lease_outlives_its_first_expiry(store: ArtifactStore) -> None:
    holder = Lease(store, "jobs/x/runner.lease", "runner", ttl_s=2.0)
    assert holder.acquire()
    for _ in range(3):
        time.sleep(1.0)
        assert holder.renew()
        assert not Lease(store, holder.key, "sweeper", ttl_s=2.0).acquire()
    time.sleep(2.5)  # no more renewals: the holder is presumed dead
    assert Lease(store, holder.key, "sweeper", ttl_s=2.0).acquire()
    assert runner_lease(store, "x", "sweeper").key == holder.key


def test_a_stalled_holder_can_neither_renew_nor_release_the_lease_another_took_over(store: ArtifactStore) -> None:
    stalled = Lease(store, "jobs/y/runner.lease", "replica-a", ttl_s=1.0)
    assert stalled.acquire() and stalled.renew()
    time.sleep(1.5)  # replica-a stalls past the expiry; replica-b takes the job over
    taker = Lease(store, stalled.key, "replica-b", ttl_s=60)
    assert taker.acquire()
    assert stalled.renew() is False  # replica-a learns it must stop, and writes nothing
    stalled.release()
    assert stalled.holder() == "replica-b" and not Lease(store, stalled.key, "replica-c", ttl_s=60).acquire()
    taker.release()
    assert not taker.held() and taker.renew() is False  # released: renewing does not bring it back


def test_a_waiter_sees_when_the_rebuilder_died_and_takes_the_lease_over(store: ArtifactStore) -> None:
    subject = new_subject_id()
    rebuilder = rebuild_lease(store, subject, "rebuilder", ttl_s=1.0)
    waiter = rebuild_lease(store, subject, "waiter", ttl_s=60)
    assert rebuilder.acquire() and waiter.held() and not waiter.expired()
    time.sleep(1.5)  # the rebuilder died without releasing
    assert waiter.held() and waiter.expired() and waiter.acquire()
    waiter.release()
    assert not waiter.held() and not waiter.expired()  # released: nothing to take over
