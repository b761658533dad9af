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
import time
from dataclasses import dataclass, field
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from .artifact_store import ArtifactNotFound, ArtifactStore
from .jobs import FINISHED
from .subjects import (
    UnknownSubject,
    acquire_lease,
    delete_subject,
    is_image_key,
    is_subject_id,
    record_key,
)

logger = logging.getLogger("ray.serve")
LEASE_KEY = "service/retention.lease"
# A subject claimed for its owner but never recorded (its request died before the anchors were
# stored) is an orphan after this long.
ORPHAN_CLAIM_S = 3600.0


class RetentionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    images_s: Optional[float] = Field(None, gt=0)
    subjects_s: Optional[float] = Field(None, gt=0)
    jobs_s: Optional[float] = Field(None, gt=0)
    interval_s: float = Field(3600.0, gt=0)
    collect: bool = True


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
    for artifact in store.list_prefix("owners/"):
        parts = artifact.key.split("/")  # owners/<owner>/subjects/<id>
        if (len(parts) == 4 and is_subject_id(parts[3]) and now - artifact.modified_at > ORPHAN_CLAIM_S
                and not store.exists(record_key(parts[3]))):
            done.orphan_claims += store.delete_prefix(artifact.key)
    return done


def collect_if_due(store: ArtifactStore, policy: RetentionSettings, owner: str) -> Optional[Collected]:
    """Run the collector unless another replica ran it within `interval_s` (the lease stays
    until it expires: it marks the last run as well as the running one)."""
    if not policy.collect or (policy.images_s is None and policy.subjects_s is None and policy.jobs_s is None):
        return None
    if not acquire_lease(store, LEASE_KEY, owner, policy.interval_s):
        return None
    done = collect(store, policy)
    if done.images or done.subjects or done.orphan_claims or done.jobs:
        logger.info("retention: deleted %d images, %d subjects, %d orphan claims, %d jobs",
                    done.images, done.subjects, done.orphan_claims, done.jobs)
    return done
