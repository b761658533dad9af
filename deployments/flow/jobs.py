"""Jobs: long requests answered at once with an id, run in the background, durable in the store.

Layout in the artifact store (so any Ingress replica can answer for any job, and a job outlives
the replica that started it):

  jobs/<job_id>/plan.json         the planned request (plans.py), written once when the job is
                                  accepted; the runner reads it, nothing is checked again
  jobs/<job_id>/inputs/<kind>-<i>.png  the plan's uploaded photos and controls, decoded once
  jobs/<job_id>/job.json          the JobRecord: status, progress, result or error, rewritten as
                                  the job goes on
  jobs/<job_id>/events/<seq>.json the events a client streams (progress, image, status), in order
  jobs/<job_id>/runner.lease      held by the replica running it, renewed while it runs; a
                                  job whose lease expired is taken over by another replica
  active-jobs/<job_id>            present while the job is not finished: what replicas sweep
  queue/<accepted ms>-<job_id>    present while the job waits for a runner; listed in key order,
                                  it is the queue every replica takes jobs from, oldest first
  job-slots/<owner>/<n>           one of the key's `max_queued_jobs` places (slots.py), held
                                  from acceptance until the job finishes
  jobs/<job_id>/cancel            written by DELETE on any replica; the runner stops the work
  idempotency/<owner>/<sha256>    the job a client's Idempotency-Key made and the sha256 of the
                                  request it came with (create-if-absent)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import uuid
from typing import Any, Literal, Optional

from consistory.progress import StepProgress
from pydantic import BaseModel, ConfigDict, field_validator

from ..artifact_store import ArtifactNotFound, ArtifactStore
from .plans import MadeImage, Plan
from .slots import release_slot
from .subjects import release_subject

JobKind = Literal["story", "subject", "images"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED = ("succeeded", "failed", "cancelled")
_JOB_ID = re.compile(r"[0-9a-f]{32}")
QUEUE = "queue/"
JOB_SLOTS = "job-slots/"


class UnknownJob(KeyError):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"no job with id {self.job_id!r}; POST /v1/jobs answers the job_id to use"


class RunningImage(BaseModel):
    """The last step the model replicas reported for an image being made."""

    index: int
    progress: StepProgress


class JobRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    job_id: str
    kind: JobKind
    owner: Optional[str] = None
    subject_id: Optional[str] = None  # made at creation for story and subject jobs: retries reuse it
    request_id: str  # names the images' folder, so a retried job overwrites instead of duplicating
    response_format: str = "url"  # of the result, as the synchronous route would answer
    status: JobStatus = "queued"
    created_at: float
    updated_at: float
    images_total: int
    images_done: int = 0
    running: list[RunningImage] = []
    images: list[MadeImage] = []  # each stored image, in the order they finished
    result: Optional[dict[str, Any]] = None
    error: Optional[dict[str, Any]] = None  # {"status": <HTTP status>, "detail": "..."}
    events: int = 0  # events written so far; the next one's id
    job_slot: Optional[int] = None  # its place among its key's queued jobs (slots.py)
    queue_position: Optional[int] = None  # while queued: the place its last event told

    @field_validator("running", mode="before")
    @classmethod
    def _steps_only(cls, running: Any) -> Any:
        # What runs is reported again within a step: entries of another shape (a record written
        # by an older version of the service) are dropped rather than refused.
        return [r for r in running if isinstance(r, dict) and "progress" in r] if isinstance(running, list) else running

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def progress(self) -> dict[str, Any]:
        """Images done of total and each running image's last step: the `progress` of the job's
        answer and of its progress events."""
        return {"images_done": self.images_done, "images_total": self.images_total,
                "running": [{"index": r.index, **dataclasses.asdict(r.progress)} for r in self.running]}

    @classmethod
    def of_plan(cls, job_id: str, plan: Plan) -> "JobRecord":
        now = time.time()
        return cls(job_id=job_id, kind=plan.kind, owner=plan.owner, subject_id=plan.subject_id,
                   request_id=plan.request_id, response_format=plan.response_format, created_at=now,
                   updated_at=now, images_total=len(plan.prompts))


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(text: str) -> bool:
    return isinstance(text, str) and _JOB_ID.fullmatch(text) is not None


def job_key(job_id: str) -> str:
    return f"jobs/{job_id}/job.json"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def plan_key(job_id: str) -> str:
    return f"jobs/{job_id}/plan.json"


def active_key(job_id: str) -> str:
    return f"active-jobs/{job_id}"


def event_key(job_id: str, seq: int) -> str:
    return f"jobs/{job_id}/events/{seq:08d}.json"


def cancel_key(job_id: str) -> str:
    return f"jobs/{job_id}/cancel"


def queue_key(job: JobRecord) -> str:
    return f"{QUEUE}{int(job.created_at * 1000):013d}-{job.job_id}"


def job_slots_prefix(owner: Optional[str]) -> str:
    return f"{JOB_SLOTS}{owner or '_'}/"


def idempotency_key(owner: Optional[str], given: str) -> str:
    digest = hashlib.sha256(given.encode("utf-8", "surrogatepass")).hexdigest()
    return f"idempotency/{owner or '_'}/{digest}"


def idempotency_entry(job_id: str, request_sha256: str) -> bytes:
    return json.dumps({"job_id": job_id, "request_sha256": request_sha256}).encode()


def read_idempotency_entry(data: bytes) -> tuple[str, Optional[str]]:
    """The job and its request's sha256 (None in an entry from before requests were hashed)."""
    text = data.decode()
    if is_job_id(text):
        return text, None
    entry = json.loads(text)
    return entry["job_id"], entry["request_sha256"]


def save_new_job(store: ArtifactStore, job: JobRecord, plan: Plan) -> None:
    """A new job: its plan once (progress saves, every second while it runs, rewrite only the
    record), its first event with its place in the queue, its record, and its marks as queued
    and active (queued first: a job seen active but not queued has been started)."""
    store.put(plan_key(job.job_id), json.dumps(plan.to_json(store, job_prefix(job.job_id))).encode(),
              "application/json")
    mine = queue_key(job)
    job.queue_position = sum(1 for a in store.list_prefix(QUEUE) if a.key < mine)
    append_event(store, job, "status", {"status": "queued", "queue_position": job.queue_position})
    save_job(store, job)
    store.put(mine, b"", "application/octet-stream")
    store.put(active_key(job.job_id), b"", "application/octet-stream")


def queued_job_ids(store: ArtifactStore) -> list[str]:
    """The jobs waiting for a runner, first to start first."""
    return [a.key.rsplit("-", 1)[1] for a in store.list_prefix(QUEUE) if is_job_id(a.key.rsplit("-", 1)[-1])]


def queue_position(store: ArtifactStore, job: JobRecord) -> Optional[int]:
    """How many jobs start before this one; None once it is not waiting."""
    ids = queued_job_ids(store)
    return ids.index(job.job_id) if job.job_id in ids else None


def save_job(store: ArtifactStore, job: JobRecord) -> None:
    job.updated_at = time.time()
    store.put(job_key(job.job_id), job.model_dump_json().encode(), "application/json")


def load_job(store: ArtifactStore, job_id: str) -> JobRecord:
    if not is_job_id(job_id):
        raise UnknownJob(job_id)
    try:
        return JobRecord.model_validate_json(store.get(job_key(job_id)))
    except ArtifactNotFound:
        raise UnknownJob(job_id) from None


def load_plan(store: ArtifactStore, job_id: str) -> Plan:
    """The job's plan with its uploaded images, as it was accepted."""
    return Plan.from_json(json.loads(store.get(plan_key(job_id))), store)


def active_job_ids(store: ArtifactStore) -> list[str]:
    return [a.key.split("/")[1] for a in store.list_prefix("active-jobs/")]


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


UNPLANNED = ("this job was accepted by an earlier version of the service, which did not store its plan, "
             "and cannot be resumed; its finished images are listed; send the request again for the rest")
UNREADABLE_PLAN = ("this job's stored plan or its uploaded images cannot be read any more, so it cannot be "
                   "resumed; its finished images are listed; send the request again for the rest")


def end_unplanned(store: ArtifactStore, job: JobRecord, detail: str = UNPLANNED, cancelled: bool = False) -> None:
    """Ends a job whose plan cannot be had (failed, saying why; or cancelled, as its client
    asked) and frees what it holds."""
    if job.kind != "images" and job.subject_id and not job.images:
        release_subject(store, job.owner, job.subject_id)  # nothing delivered: as a failed job, no subject
    job.status, job.running, job.queue_position = ("cancelled" if cancelled else "failed"), [], None
    if not cancelled:
        job.error = {"status": 409, "detail": detail}
    append_event(store, job, "status", {"status": job.status, **({} if cancelled else {"error": job.error})})
    save_job(store, job)
    clear_marks(store, job)


def clear_marks(store: ArtifactStore, job: JobRecord) -> None:
    """What a finished job no longer holds: its place in the queue, its key's job slot, its mark
    as active (last: while that exists, a replica finishes this if the runner could not)."""
    store.delete_prefix(queue_key(job))
    if job.job_slot is not None:
        release_slot(store, job_slots_prefix(job.owner), job.job_slot, job.job_id)
    store.delete_prefix(active_key(job.job_id))
