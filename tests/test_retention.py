"""Retention on the local store and on S3 (moto on loopback): images and subjects past their age
are deleted, everything else stays, and one replica at a time collects."""

from __future__ import annotations

import time

import pytest

from deployments.artifact_store import ArtifactStore
from deployments.flow.retention import ORPHAN_CLAIM_S, RetentionSettings, collect, collect_if_due
from deployments.flow.subjects import (
    cache_key,
    claim_subject,
    image_key,
    new_request_id,
    new_subject_id,
    owner_key,
    record_key,
)
from s3_server import aws_dummy_credentials, each_store, s3_bucket, s3_endpoint  # noqa: F401

DAY = 86400.0


@pytest.fixture
def store(each_store: ArtifactStore) -> ArtifactStore:
    return each_store


def _subject(store: ArtifactStore, owner: str = "alice") -> tuple[str, str]:
    subject_id = new_subject_id()
    claim_subject(store, owner, subject_id, None)
    store.put(cache_key(subject_id), b"cache", "application/octet-stream")
    store.put(record_key(subject_id), b'{"owner": "%s"}' % owner.encode(), "application/json")
    image = image_key(subject_id, new_request_id(), 0)
    store.put(image, b"png", "image/png")
    return subject_id, image


def test_old_images_go_and_their_subject_stays(store: ArtifactStore) -> None:
    subject_id, image = _subject(store)
    kept = collect(store, RetentionSettings(images_s=DAY), now=time.time() + DAY / 2)
    assert kept.images == 0 and store.exists(image)
    done = collect(store, RetentionSettings(images_s=DAY), now=time.time() + 2 * DAY)
    assert done.images == 1 and not store.exists(image)
    assert store.exists(record_key(subject_id)) and store.exists(cache_key(subject_id))


def test_old_subjects_go_whole_with_their_owner_index(store: ArtifactStore) -> None:
    old, old_image = _subject(store)
    done = collect(store, RetentionSettings(subjects_s=DAY), now=time.time() + 2 * DAY)
    assert done.subjects == 1
    assert not any(store.exists(k) for k in (record_key(old), cache_key(old), old_image, owner_key("alice", old)))
    young, _ = _subject(store)
    assert collect(store, RetentionSettings(subjects_s=DAY)).subjects == 0 and store.exists(record_key(young))


def test_claims_whose_subject_never_came_are_removed_after_an_hour(store: ArtifactStore) -> None:
    orphan = new_subject_id()
    claim_subject(store, "bob", orphan, None)
    kept, _ = _subject(store, owner="bob")
    assert collect(store, RetentionSettings(), now=time.time() + 60).orphan_claims == 0
    done = collect(store, RetentionSettings(), now=time.time() + ORPHAN_CLAIM_S + 60)
    assert done.orphan_claims == 1
    assert not store.exists(owner_key("bob", orphan)) and store.exists(owner_key("bob", kept))


def test_one_collector_per_interval_and_none_when_off(store: ArtifactStore) -> None:
    policy = RetentionSettings(images_s=DAY, interval_s=3600)
    assert collect_if_due(store, policy, "replica-1") is not None
    assert collect_if_due(store, policy, "replica-2") is None  # within the interval
    assert collect_if_due(store, RetentionSettings(), "replica-3") is None  # nothing to expire
    assert collect_if_due(store, RetentionSettings(images_s=DAY, collect=False), "replica-3") is None


def test_finished_jobs_go_after_their_age_and_running_ones_stay(store: ArtifactStore) -> None:
    from deployments.flow.jobs import JobRecord, job_key, new_job_id, save_job

    def job(status: str) -> str:
        now = time.time()
        record = JobRecord(job_id=new_job_id(), kind="story", request={}, request_id=new_request_id(),
                           created_at=now, updated_at=now, images_total=1, status=status)
        save_job(store, record)
        store.put(f"jobs/{record.job_id}/events/00000000.json", b"{}", "application/json")
        return record.job_id

    finished, running = job("succeeded"), job("running")
    assert collect(store, RetentionSettings(jobs_s=DAY), now=time.time() + DAY / 2).jobs == 0
    done = collect(store, RetentionSettings(jobs_s=DAY), now=time.time() + 2 * DAY)
    assert done.jobs == 1 and list(store.list_prefix(f"jobs/{finished}/")) == []
    assert store.exists(job_key(running))
