"""Jobs: a story, a subject or new images answered at once (202) and made in the background,
followed by polling or by Server-Sent Events, and cancelled."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Optional

from fastapi import APIRouter, Depends, Header
from fastapi.responses import StreamingResponse

from ...errors import not_found
from ...flow.jobs import JobRecord, UnknownJob, cancel_requested, queue_position
from ..access import current_caller
from ..api_keys import Caller
from ..planning import job_kind
from ..responses import documented, images_response
from ..schemas import JobOut, JobRequest
from ...numbers import ascii_integer
from ..services import Services, services
from ..sse import EventStreamResponse

router = APIRouter()


@router.post("/v1/jobs", response_model=JobOut, response_model_exclude_none=True, status_code=202,
             responses=documented(401, 404, 408, 409, 413, 422, 429, 503))
async def create_job(body: JobRequest, caller: Caller = Depends(current_caller),
                     idempotency: Optional[str] = Header(None, alias="Idempotency-Key", max_length=255),
                     svc: Services = Depends(services)) -> JobOut:
    """Starts a story, a subject or new images as a job: 202 with its id at once; follow it at
    `status_url` or stream `events_url`. It waits in the queue (`queue_position`) until a runner
    is free, however busy the model replicas are. The same `Idempotency-Key` with the same body
    gives the same job; with another body, 422. Over the key's `max_subjects` or queued jobs, 429."""
    kind = job_kind({"story": body.story, "subject": body.subject, "images": body.images})
    if kind == "images":
        plan = await svc.planner.images(body.images.subject_id, body.images, caller)
    else:
        plan = await svc.planner.story(getattr(body, kind), caller)
    # The request the key is bound to: its body as parsed, so that spacing and key order do not count.
    request_sha256 = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    job = await svc.jobs.submit(plan, request_sha256=request_sha256, idempotency=idempotency,
                                max_subjects=caller.max_subjects,
                                max_queued_jobs=caller.key.max_queued_jobs if caller.key is not None else None)
    return await _job_out(svc, job)


@router.get("/v1/jobs/{job_id}", response_model=JobOut, response_model_exclude_none=True,
            responses=documented(401, 404, 422, 429, 503))
async def get_job(job_id: str, caller: Caller = Depends(current_caller), svc: Services = Depends(services)) -> JobOut:
    """Status and progress (images done of total, the step of each image being made); the
    result or the error once it has finished."""
    return await _job_out(svc, await _visible_job(svc, job_id, caller))


@router.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "Server-Sent Events: progress, image, status."},
                       **documented(401, 404, 422, 429, 503)})
async def job_events(job_id: str, caller: Caller = Depends(current_caller),
                     last_event_id: Optional[str] = Header(None, alias="Last-Event-ID"),
                     svc: Services = Depends(services)) -> EventStreamResponse:
    """The job's events as they happen. Reconnect with `Last-Event-ID` to miss nothing (an id
    that is not a number of at most 18 digits is ignored: the stream starts from the first
    event); the stream ends after the final status event. A replica holds a bounded number of
    streams, in all and per API key: past either, 429 with Retry-After."""
    await _visible_job(svc, job_id, caller)
    last = ascii_integer(last_event_id, max_digits=18)
    return EventStreamResponse(svc.events.open(job_id, caller.name, -1 if last is None else last))


@router.delete("/v1/jobs/{job_id}", response_model=JobOut, response_model_exclude_none=True, status_code=202,
               responses=documented(401, 404, 422, 429, 503))
async def cancel_job(job_id: str, caller: Caller = Depends(current_caller), svc: Services = Depends(services)) -> JobOut:
    """Cancels the job: a queued one ends at once; work running on the model replicas stops.
    Images already made stay (in the `result`, the job's events, and under its subject); a
    story or subject cancelled before any image leaves no subject."""
    job = await _visible_job(svc, job_id, caller)
    return await _job_out(svc, await svc.jobs.cancel(job))


async def _visible_job(svc: Services, job_id: str, caller: Caller) -> JobRecord:
    """The job if the caller may see it; another key's job is as unknown as a missing one."""
    job = await svc.jobs.load(job_id)
    if not caller.may_see(job.owner):
        raise not_found(str(UnknownJob(job_id)))
    return job


async def _job_out(svc: Services, job: JobRecord) -> JobOut:
    base = f"{(svc.settings.public_base_url or '').rstrip('/')}/v1/jobs/{job.job_id}"
    out = JobOut(
        job_id=job.job_id, kind=job.kind, status=job.status, subject_id=job.subject_id,
        created_at=job.created_at, updated_at=job.updated_at, progress=job.progress(),
        status_url=base, events_url=base + "/events",
        cancel_requested=(not job.finished) and await asyncio.to_thread(cancel_requested, svc.store, job.job_id),
    )
    if job.status == "succeeded" or (job.status == "cancelled" and job.images):
        out.result = await images_response(svc.links, job.subject_id, job.images, job.response_format, {})
    if job.status == "queued":
        out.queue_position = await asyncio.to_thread(queue_position, svc.store, job)
    if job.error is not None:
        out.error, out.error_status = {"detail": job.error["detail"]}, job.error["status"]
    return out

