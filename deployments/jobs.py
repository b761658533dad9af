"""Jobs: long requests answered at once with an id, run in the background, durable in the store.

Layout in the artifact store (so any Ingress replica can answer for any job, and a job outlives
the replica that started it):

  jobs/<job_id>/request.json      the request, written once (it may carry megabytes of images)
  jobs/<job_id>/job.json          the rest of the JobRecord: status, progress, result or error,
                                  rewritten as the job goes on
  jobs/<job_id>/events/<seq>.json the events a client streams (progress, image, status), in order
  jobs/<job_id>/runner.lease      held by the replica running it, renewed while it runs; a
                                  job whose lease expired is taken over by another replica
  jobs/<job_id>/cancel            written by DELETE on any replica; the runner stops the work
  idempotency/<owner>/<sha256>    the job a client's Idempotency-Key made (create-if-absent)
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict

from .artifact_store import ArtifactNotFound, ArtifactStore

JobKind = Literal["story", "subject", "images"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED = ("succeeded", "failed", "cancelled")
_JOB_ID = re.compile(r"[0-9a-f]{32}")


class UnknownJob(KeyError):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"no job with id {self.job_id!r}; POST /v1/jobs answers the job_id to use"


class RunningImage(BaseModel):
    index: int
    pass_index: int
    step: int
    steps: int


class JobRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    job_id: str
    kind: JobKind
    request: dict[str, Any] = {}  # the body of the synchronous route it stands for (request.json)
    owner: Optional[str] = None
    subject_id: Optional[str] = None  # made at creation for story and subject jobs: retries reuse it
    request_id: str  # names the images' folder, so a retried job overwrites instead of duplicating
    status: JobStatus = "queued"
    created_at: float
    updated_at: float
    images_total: int
    n_anchors: Optional[int] = None  # story and subject jobs
    seed: Optional[int] = None  # the first image's seed (story and subject jobs)
    images_done: int = 0
    running: list[RunningImage] = []
    images: list[dict[str, Any]] = []  # ImageOut of each stored image, in the order they finished
    result: Optional[dict[str, Any]] = None
    error: Optional[dict[str, Any]] = None  # {"status": <HTTP status>, "detail": "..."}
    events: int = 0  # events written so far; the next one's id

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(text: str) -> bool:
    return isinstance(text, str) and _JOB_ID.fullmatch(text) is not None


def job_key(job_id: str) -> str:
    return f"jobs/{job_id}/job.json"


def request_key(job_id: str) -> str:
    return f"jobs/{job_id}/request.json"


def event_key(job_id: str, seq: int) -> str:
    return f"jobs/{job_id}/events/{seq:08d}.json"


def runner_lease_key(job_id: str) -> str:
    return f"jobs/{job_id}/runner.lease"


def cancel_key(job_id: str) -> str:
    return f"jobs/{job_id}/cancel"


def idempotency_key(owner: Optional[str], given: str) -> str:
    digest = hashlib.sha256(given.encode("utf-8", "surrogatepass")).hexdigest()
    return f"idempotency/{owner or '_'}/{digest}"


def save_new_job(store: ArtifactStore, job: JobRecord) -> None:
    """A new job: its request once, then its record."""
    store.put(request_key(job.job_id), json.dumps(job.request).encode(), "application/json")
    save_job(store, job)


def save_job(store: ArtifactStore, job: JobRecord) -> None:
    """The record without its request (stored once by `save_new_job`): progress, saved every
    second while a job runs, rewrites only what changes."""
    job.updated_at = time.time()
    store.put(job_key(job.job_id), job.model_dump_json(exclude={"request"}).encode(), "application/json")


def load_job(store: ArtifactStore, job_id: str) -> JobRecord:
    if not is_job_id(job_id):
        raise UnknownJob(job_id)
    try:
        job = JobRecord.model_validate_json(store.get(job_key(job_id)))
        job.request = json.loads(store.get(request_key(job_id)))
    except ArtifactNotFound:
        raise UnknownJob(job_id) from None
    return job


def append_event(store: ArtifactStore, job: JobRecord, kind: str, data: dict[str, Any]) -> None:
    """Stores the next event; the job record (saved by the caller) counts them."""
    body = json.dumps({"id": job.events, "event": kind, "data": data}).encode()
    store.put(event_key(job.job_id, job.events), body, "application/json")
    job.events += 1


def events_after(store: ArtifactStore, job_id: str, last_id: int) -> list[dict[str, Any]]:
    """The job's events with an id above `last_id`, in order."""
    prefix = f"jobs/{job_id}/events/"
    found = []
    for artifact in store.list_prefix(prefix):
        name = artifact.key[len(prefix):].removesuffix(".json")
        if name.isdigit() and int(name) > last_id:
            try:
                found.append(json.loads(store.get(artifact.key)))
            except ArtifactNotFound:
                continue
    return sorted(found, key=lambda e: e["id"])


def cancel_requested(store: ArtifactStore, job_id: str) -> bool:
    return store.exists(cancel_key(job_id))


def request_cancel(store: ArtifactStore, job_id: str) -> None:
    store.put(cancel_key(job_id), b"", "application/octet-stream")
