"""Retention: how long images and subjects are kept, and the collector that enforces it.

`retention` in the service's args (seconds; None keeps forever):
  images_s     an image's age (since it was stored) after which it is deleted
  subjects_s   a subject's age (since its record was last written: made, or its cache rebuilt)
               after which the subject goes whole: record first, then cache, images, owner index
  jobs_s       a finished job's age (since its last update) after which its record and events go
  interval_s   how often an Ingress replica runs the collector; one replica at a time collects
               (a lease in the store), so N replicas do not list the store N times

It runs against the local store and S3 alike by listing `subjects/`; on a bucket with very many
objects each run costs a full LIST, so there an S3 lifecycle rule expiring the store's
`subjects/` prefix does the same work for free (cluster/s3-lifecycle.json; README of cluster/)
and `collect: false` turns the collector off.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

from ..artifact_store import ArtifactNotFound, ArtifactStore
from ..settings import RetentionSettings
from .jobs import FINISHED, UnknownJob, active_job_ids, load_job
from .leases import retention_lease
from .slots import held_slots
from .subjects import (
    UnknownSubject,
    delete_subject,
    is_image_key,
    is_subject_id,
    record_key,
    release_subject,
)

logger = logging.getLogger("ray.serve")
# A subject claimed for its owner but never recorded (its request died before the anchors were
# stored, and no job will make it) is an orphan after this long; so is a mark of a forgotten
# subject, past any anchors of it that were still being made.
ORPHAN_CLAIM_S = 3600.0


@dataclass
class Collected:
    images: int = 0
    subjects: int = 0
    orphan_claims: int = 0
    jobs: int = 0
    errors: list[str] = field(default_factory=list)


def collect(store: ArtifactStore, policy: RetentionSettings, now: Optional[float] = None) -> Collected:
    """One pass of the collector. Idempotent: several at once delete nothing twice that matters."""
    now = time.time() if now is None else now
    done = Collected()
    expired_subjects: list[str] = []
    for artifact in store.list_prefix("subjects/"):
        parts = artifact.key.split("/")
        if len(parts) < 3 or not is_subject_id(parts[1]):
            continue
        age = now - artifact.modified_at
        if artifact.key == record_key(parts[1]):
            if policy.subjects_s is not None and age > policy.subjects_s:
                expired_subjects.append(parts[1])
        elif policy.images_s is not None and is_image_key(artifact.key) and age > policy.images_s:
            done.images += store.delete_prefix(artifact.key)
    for subject_id in expired_subjects:
        try:
            delete_subject(store, subject_id)
            done.subjects += 1
        except UnknownSubject:
            pass  # deleted meanwhile
    if policy.jobs_s is not None:
        for artifact in store.list_prefix("jobs/"):
            parts = artifact.key.split("/")  # jobs/<id>/job.json
            if len(parts) == 3 and parts[2] == "job.json" and now - artifact.modified_at > policy.jobs_s:
                try:
                    finished = json.loads(store.get(artifact.key)).get("status") in FINISHED
                except (ArtifactNotFound, ValueError):
                    finished = True
                if finished:
                    store.delete_prefix(f"jobs/{parts[1]}/")
                    done.jobs += 1
    _collect_claims(store, now, done)
    return done


def _collect_claims(store: ArtifactStore, now: float, done: Collected) -> None:
    """Claims whose subject never came to be (its request died before the anchors were stored):
    its owner's index entry and quota slot. A subject an unfinished job will make is no orphan,
    however long the job waits in the queue."""
    held_by_jobs = set()
    for job_id in active_job_ids(store):
        try:
            held_by_jobs.add(load_job(store, job_id).subject_id)
        except UnknownJob:
            continue

    def orphan(subject_id: str, modified_at: float) -> bool:
        return (now - modified_at > ORPHAN_CLAIM_S and subject_id not in held_by_jobs
                and not store.exists(record_key(subject_id)))

    indexed: dict[str, set[str]] = defaultdict(set)
    slots: dict[str, int] = defaultdict(int)
    for artifact in store.list_prefix("owners/"):
        parts = artifact.key.split("/")  # owners/<owner>/subjects/<id> or owners/<owner>/slots/<n>
        if len(parts) == 4 and parts[2] == "slots":
            slots[parts[1]] += 1
        elif len(parts) == 4 and parts[2] == "subjects" and is_subject_id(parts[3]):
            if orphan(parts[3], artifact.modified_at):
                release_subject(store, parts[1], parts[3])
                done.orphan_claims += 1
            else:
                indexed[parts[1]].add(parts[3])
    for owner in [o for o, n in slots.items() if n > len(indexed[o])]:
        # More slots than subjects: a request died between taking a slot and indexing its subject.
        for slot in held_slots(store, f"owners/{owner}/slots/"):
            if slot.holder not in indexed[owner] and orphan(slot.holder, slot.modified_at):
                done.orphan_claims += store.delete_prefix(slot.key)
    for artifact in store.list_prefix("forgotten/"):
        if now - artifact.modified_at > ORPHAN_CLAIM_S:  # no anchors of it can still be under way
            store.delete_prefix(artifact.key)


def collect_if_due(store: ArtifactStore, policy: RetentionSettings, owner: str) -> Optional[Collected]:
    """Run the collector unless another replica ran it within `interval_s` (the lease stays
    until it expires: it marks the last run as well as the running one)."""
    if not policy.collect or (policy.images_s is None and policy.subjects_s is None and policy.jobs_s is None):
        return None
    if not retention_lease(store, owner, policy.interval_s).acquire():
        return None
    done = collect(store, policy)
    if done.images or done.subjects or done.orphan_claims or done.jobs:
        logger.info("retention: deleted %d images, %d subjects, %d orphan claims, %d jobs",
                    done.images, done.subjects, done.orphan_claims, done.jobs)
    return done


def collect_forever(store: ArtifactStore, policy: RetentionSettings, owner: str, stop: threading.Event) -> None:
    """The collector, on a thread of each Ingress replica: it looks every few minutes, and the
    replica that gets the store's lease collects (at most once per `interval_s`)."""
    while not stop.is_set():
        try:
            collect_if_due(store, policy, owner)
        except Exception:
            logger.exception("retention collector failed; retrying at the next interval")
        stop.wait(min(policy.interval_s, 300.0))
