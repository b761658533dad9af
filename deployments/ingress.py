"""Ingress: the v1 HTTP API (FastAPI), on a CPU with no model.

It validates requests (off the event loop, before any model is called), assigns subject ids,
asks the AnchorStage for anchors, fans the other prompts out over Generator replicas one image
per call, stores every image before reporting it, and answers with URLs or base64 PNGs in prompt
order. Anchor caches pass through here only as handles; their bytes go from the AnchorStage to
Generators through Ray's object store. A story that fails after its anchors (a full queue, a
client that left) leaves nothing behind: its subject is deleted again.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' types at
# run time, and Serve's class-based routes cannot resolve postponed (string) annotations.
import asyncio
import json
import os
import secrets
import socket
import threading
import time
from typing import Any, Optional

from fastapi import Depends, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from .access import Access, current_caller
from .api_keys import Caller
from .artifact_store import LocalArtifactStore, artifact_store_from_config
from .checks import check_prompts, check_seeds, check_subject_tokens, check_subjects, first_seed, request_config, unprocessable
from .images import to_b64
from .ingress_app import app, edge_limits, logger
from .job_runner import JobRunner, active_key, image_entry, take_lease
from .jobs import (
    FINISHED,
    JobRecord,
    UnknownJob,
    append_event,
    cancel_requested,
    events_after,
    idempotency_key,
    load_job,
    new_job_id,
    request_cancel,
    save_new_job,
)
from .messages import AnchorsResult, ImageResult
from .metrics import count_images, count_job, observe_stage, observe_time_to_consistent_subject
from .readiness import Readiness
from .remote import CacheRefs, call, gather_in_order
from .responses import documented
from .retention import collect_if_due
from .schemas import (
    DeletedOut,
    HealthOut,
    ImageOut,
    ImagesRequest,
    ImagesResponse,
    JobOut,
    JobRequest,
    ReadyOut,
    StoryRequest,
    SubjectListOut,
    SubjectOut,
    SubjectRequest,
)
from .settings import ServiceSettings
from .signed_urls import check_signature, signed_url
from .uploads import Uploads, decode_uploads
from .subjects import (
    OverQuota,
    SubjectRecord,
    UnknownSubject,
    all_subject_ids,
    claim_subject,
    delete_subject as forget_subject,
    owned_subject_ids,
    release_subject,
    image_key,
    is_image_key,
    load_record,
    new_request_id,
    new_subject_id,
    record_key,
)

ARTIFACTS = "/v1/artifacts"
JOB_SWEEP_S = 5.0  # how often each replica looks for jobs whose runner died
EVENT_POLL_S = 0.5  # how often an event stream looks for new events
SIGNING_KEY = "service/url-signing-key"  # in the local store, readable by this service only
NO_IMAGE = "no image at this address: it was never made, its subject was deleted, or it has expired"


def _not_found(error: UnknownSubject) -> HTTPException:
    return HTTPException(status_code=404, detail=str(error))


class _ForgetOnFailure:
    """Deletes a just-made subject if what follows its anchors fails or is cancelled, so its id,
    which the client never got, leaves no record, cache or images behind."""

    def __init__(self, ingress: "Ingress", subject_id: str, owner: Optional[str]) -> None:
        self.ingress, self.subject_id, self.owner = ingress, subject_id, owner

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind, error, traceback) -> None:
        if kind is None:
            return
        ingress = self.ingress
        ingress.refs.drop(self.subject_id)
        try:  # shielded: a cancelled request must still clean up
            await asyncio.shield(asyncio.to_thread(release_subject, ingress.store, self.owner, self.subject_id))
        except Exception:  # the original failure is what the client must see
            logger.exception("could not remove subject %s after a failed request", self.subject_id)


def _load_tokenizer(model: str):
    """The model's first tokenizer, for the token check; None where it cannot be had here (the
    model replicas then report the problem)."""
    from .settings import PRESET_PREFIX

    try:
        if model.startswith(PRESET_PREFIX):
            from consistory.tokenizer import build_local_clip_tokenizer

            return build_local_clip_tokenizer()
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    except Exception as error:  # no network, no files: the check is an early warning only
        logger.warning("no tokenizer for %s (%s); prompts are token-checked by the model replicas", model, error)
        return None


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, anchor_stage: DeploymentHandle, generator: DeploymentHandle, settings: dict[str, Any]) -> None:
        self.settings = ServiceSettings.model_validate(settings)
        self.anchor_stage = anchor_stage
        self.generator = generator
        self.store = artifact_store_from_config(self.settings.store)
        self.refs = CacheRefs(self.settings.ingress_cache_refs)
        self.readiness = Readiness(self.settings.ready_cache_s)
        key = os.environ.get("CONSISTORY_URL_SIGNING_KEY") or self.settings.url_signing_key
        self._signing_key = key.encode() if key else self._shared_signing_key()
        app.state.access = Access()
        app.state.access.configure(self.settings.auth)
        self._replica = f"{socket.gethostname()}:{os.getpid()}"
        self._collector = threading.Thread(target=self._collect_forever, name="retention", daemon=True)
        self._collector.start()
        self._runners: dict[str, JobRunner] = {}
        # The constructor runs on the replica's event loop: jobs whose runner died are taken over.
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_jobs())
        edge_limits.max_bytes = self.settings.body_limit
        edge_limits.deadline_s = self.settings.request_deadline_s
        edge_limits.retry_after_s = self.settings.retry_after_s
        self._tokenizer = _load_tokenizer(self.settings.model)

    # --- probes ---
    @app.get("/healthz", response_model=HealthOut)
    async def healthz(self) -> HealthOut:
        return HealthOut(status="ok")

    @app.get("/readyz", response_model=ReadyOut, responses=documented(503))
    async def readyz(self) -> ReadyOut:
        """Ready while both model deployments have a running replica (asked of Serve's controller,
        not through their request queues, and cached for `ready_cache_s`)."""
        return await self.readiness.check(self.settings.model_id, self.settings.retry_after_s)

    # --- v1 API ---
    @app.post("/v1/stories", response_model=ImagesResponse, response_model_exclude_none=True,
              responses=documented(401, 413, 422, 429, 503))
    async def create_story(self, body: StoryRequest, request: Request,
                           caller: Caller = Depends(current_caller)) -> ImagesResponse:
        """The whole story: anchors first, the other prompts fanned out; images in prompt order."""
        started = time.perf_counter()
        n_anchors = self._story_anchors(body)
        await self._check(body.prompts, body.subjects)
        config = request_config(body, n_anchors, self.settings)
        seed = first_seed(body.seed, len(body.prompts))
        uploads = await asyncio.to_thread(decode_uploads, body, n_anchors, self.settings)
        subject_id, request_id = new_subject_id(), new_request_id()
        await self._claim(caller, subject_id)
        async with self._forgotten_on_failure(subject_id, caller.name):
            return await self._story(body, subject_id, request_id, n_anchors, seed, config, caller, started, uploads)

    async def _story(self, body: StoryRequest, subject_id: str, request_id: str, n_anchors: int, seed: int,
                     config, caller: Caller, started: float, uploads: Uploads) -> ImagesResponse:
        anchors = await self._anchors(subject_id, body.prompts[:n_anchors], body.subjects, seed, config, caller.name,
                                      uploads.anchor_kwargs(n_anchors))
        anchors_done = time.perf_counter()
        first_new: list[float] = []

        async def new_image(index: int) -> ImageOut:
            image = await self._new_image(subject_id, request_id, index, body.prompts[index], seed + index,
                                          body.response_format, uploads.image_kwargs(index))
            first_new.append(time.perf_counter())
            return image

        stored = [
            self._store_image(subject_id, request_id, i, body.prompts[i], anchors.seeds[i], png, body.response_format)
            for i, png in enumerate(anchors.pngs)
        ]
        images = await gather_in_order(stored + [new_image(i) for i in range(n_anchors, len(body.prompts))])
        done = time.perf_counter()
        observe_time_to_consistent_subject((min(first_new) if first_new else anchors_done) - started)
        timings = {**anchors.timings, "anchors_s": anchors_done - started, "images_s": done - anchors_done,
                   "total_s": done - started}
        if first_new:
            timings["first_image_s"] = min(first_new) - started
        return ImagesResponse(subject_id=subject_id, images=images, timings=timings)

    @app.post("/v1/subjects", response_model=ImagesResponse, response_model_exclude_none=True,
              responses=documented(401, 413, 422, 429, 503))
    async def create_subject(self, body: SubjectRequest, request: Request,
                             caller: Caller = Depends(current_caller)) -> ImagesResponse:
        """A reusable subject from its anchor prompts; answers its id and the anchor images."""
        started = time.perf_counter()
        await self._check(body.prompts, body.subjects)
        config = request_config(body, len(body.prompts), self.settings)
        seed = first_seed(body.seed, len(body.prompts))
        uploads = await asyncio.to_thread(decode_uploads, body, len(body.prompts), self.settings)
        subject_id, request_id = new_subject_id(), new_request_id()
        await self._claim(caller, subject_id)
        async with self._forgotten_on_failure(subject_id, caller.name):
            anchors = await self._anchors(subject_id, body.prompts, body.subjects, seed, config, caller.name,
                                          uploads.anchor_kwargs(len(body.prompts)))
            images = await gather_in_order(
                self._store_image(subject_id, request_id, i, prompt, anchors.seeds[i], png, body.response_format)
                for i, (prompt, png) in enumerate(zip(body.prompts, anchors.pngs))
            )
        observe_time_to_consistent_subject(anchors.timings.get("anchors_call_s", 0.0))
        timings = {**anchors.timings, "total_s": time.perf_counter() - started}
        return ImagesResponse(subject_id=subject_id, images=images, timings=timings)

    @app.get("/v1/subjects", response_model=SubjectListOut, response_model_exclude_none=True,
             responses=documented(401, 422, 429, 503))
    async def list_subjects(self, limit: int = Query(100, ge=1, le=1000), after: Optional[str] = None,
                            caller: Caller = Depends(current_caller)) -> SubjectListOut:
        """The caller's subjects (every subject for an admin key, or with auth off), by id."""
        if caller.admin:
            ids = await asyncio.to_thread(all_subject_ids, self.store)
        else:
            ids = await asyncio.to_thread(owned_subject_ids, self.store, caller.name)
        ids = sorted(i for i in ids if after is None or i > after)
        page = ids[:limit]
        return SubjectListOut(subject_ids=page, next_after=page[-1] if len(ids) > limit else None)

    @app.get("/v1/subjects/{subject_id}", response_model=SubjectOut, responses=documented(401, 404, 422, 429, 503))
    async def get_subject(self, subject_id: str, caller: Caller = Depends(current_caller)) -> SubjectRecord:
        return await self._record(subject_id, caller)

    @app.post("/v1/subjects/{subject_id}/images", response_model=ImagesResponse, response_model_exclude_none=True,
              responses=documented(401, 404, 409, 413, 422, 429, 503))
    async def create_images(self, subject_id: str, body: ImagesRequest, request: Request,
                            caller: Caller = Depends(current_caller)) -> ImagesResponse:
        """New images of an existing subject; default seeds continue the anchors'."""
        started = time.perf_counter()
        record = await self._record(subject_id, caller)
        if record.model != self.settings.model_id:
            raise HTTPException(
                status_code=409,
                detail=f"subject {subject_id} was made with model {record.model!r} but this service runs "
                f"{self.settings.model_id!r}; create the subject again with POST /v1/subjects",
            )
        await self._check(body.prompts, record.subjects, subjects_checked=True)
        check_seeds(body.seeds, body.prompts)
        seeds = list(body.seeds) if body.seeds is not None else record.default_seeds(len(body.prompts))
        uploads = await asyncio.to_thread(decode_uploads, body, 0, self.settings)
        request_id = new_request_id()
        checked = time.perf_counter()
        images = await gather_in_order(
            self._new_image(subject_id, request_id, j, prompt, seeds[j], body.response_format, uploads.image_kwargs(j))
            for j, prompt in enumerate(body.prompts)
        )
        if not await asyncio.to_thread(self.store.exists, record_key(subject_id)):
            # Deleted while its images were being made: leave nothing behind, report it gone.
            await asyncio.to_thread(self.store.delete_prefix, image_key(subject_id, request_id, 0).rsplit("/", 1)[0] + "/")
            raise HTTPException(status_code=404, detail=f"subject {subject_id} was deleted while its images were made")
        done = time.perf_counter()
        return ImagesResponse(subject_id=subject_id, images=images,
                              timings={"images_s": done - checked, "total_s": done - started})

    @app.delete("/v1/subjects/{subject_id}", response_model=DeletedOut, responses=documented(401, 404, 422, 429, 503))
    async def delete_subject(self, subject_id: str, caller: Caller = Depends(current_caller)) -> DeletedOut:
        """Forget the subject: its record, cache and images. Generators drop their copies as
        their LRUs turn over; nothing can reach them by this id any more."""
        await self._record(subject_id, caller)
        try:
            await asyncio.to_thread(forget_subject, self.store, subject_id)
        except UnknownSubject as error:
            raise _not_found(error) from None
        self.refs.drop(subject_id)
        return DeletedOut(subject_id=subject_id, deleted=True)

    # --- jobs: long requests, answered at once ---
    @app.post("/v1/jobs", response_model=JobOut, response_model_exclude_none=True, status_code=202,
              responses=documented(401, 404, 409, 413, 422, 429, 503))
    async def create_job(self, body: JobRequest, caller: Caller = Depends(current_caller),
                         idempotency: Optional[str] = Header(None, alias="Idempotency-Key", max_length=255)) -> JobOut:
        """Starts a story, a subject or new images as a job: 202 with its id at once; follow it at
        `status_url` or stream `events_url`. The same `Idempotency-Key` gives the same job."""
        given = [name for name in ("story", "subject", "images") if getattr(body, name) is not None]
        if len(given) != 1:
            raise unprocessable("give exactly one of story, subject or images (the body of the synchronous "
                                f"route); got {given or 'none'}")
        kind = given[0]
        job = await self._plan_job(kind, getattr(body, kind), caller)
        marker = idempotency_key(caller.name, idempotency) if idempotency else None
        if marker and await asyncio.to_thread(self.store.exists, marker):
            return await self._earlier_job(marker, caller)
        if job.kind != "images":
            await self._claim(caller, job.subject_id)
        if marker and not await asyncio.to_thread(self.store.create_exclusive, marker, job.job_id.encode(), "text/plain"):
            if job.kind != "images":  # another request with this key won the race
                await asyncio.to_thread(release_subject, self.store, caller.name, job.subject_id)
            return await self._earlier_job(marker, caller)
        await asyncio.to_thread(self._save_new_job, job)
        if await asyncio.to_thread(take_lease, self.store, job.job_id, self._replica):
            self._start_job(job)
        return await self._job_out(job)

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, response_model_exclude_none=True,
             responses=documented(401, 404, 422, 429, 503))
    async def get_job(self, job_id: str, caller: Caller = Depends(current_caller)) -> JobOut:
        """Status and progress (images done of total, the step of each image being made); the
        result or the error once it has finished."""
        return await self._job_out(await self._job(job_id, caller))

    @app.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "Server-Sent Events: progress, image, status."},
                        **documented(401, 404, 422, 429, 503)})
    async def job_events(self, job_id: str, request: Request, caller: Caller = Depends(current_caller),
                         last_event_id: Optional[str] = Header(None, alias="Last-Event-ID")) -> StreamingResponse:
        """The job's events as they happen. Reconnect with `Last-Event-ID` to miss nothing; the
        stream ends after the final status event."""
        await self._job(job_id, caller)
        last = int(last_event_id) if last_event_id and last_event_id.isdigit() else -1
        return StreamingResponse(self._event_stream(job_id, last, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.delete("/v1/jobs/{job_id}", response_model=JobOut, response_model_exclude_none=True, status_code=202,
                responses=documented(401, 404, 422, 429, 503))
    async def cancel_job(self, job_id: str, caller: Caller = Depends(current_caller)) -> JobOut:
        """Cancels the job: work queued or running on the model replicas stops; images already
        made stay (in `images` of the job's events, and under its subject)."""
        job = await self._job(job_id, caller)
        if not job.finished:
            await asyncio.to_thread(request_cancel, self.store, job_id)
            runner = self._runners.get(job_id)
            if runner is not None:
                runner.cancel_now()
        return await self._job_out(job)

    @app.get(ARTIFACTS + "/{key:path}", response_class=FileResponse,
             responses={200: {"content": {"image/png": {}}, "description": "The image."}, **documented(403, 404, 422)})
    async def artifact(self, key: str, expires: Optional[str] = None, signature: Optional[str] = None) -> FileResponse:
        """Images of the local artifact store, at the signed URLs it hands out."""
        if not is_image_key(key) or not isinstance(self.store, LocalArtifactStore):
            raise HTTPException(status_code=404, detail=NO_IMAGE)
        problem = check_signature(self._signing_key, key, expires, signature)
        if problem:
            raise HTTPException(status_code=403, detail=problem)
        try:
            path = self.store.path(key)
        except ValueError:
            raise HTTPException(status_code=404, detail=NO_IMAGE) from None
        if not path.is_file() or not await asyncio.to_thread(self.store.exists, record_key(key.split("/")[1])):
            raise HTTPException(status_code=404, detail=NO_IMAGE)
        return FileResponse(path, media_type="image/png")

    # --- jobs: steps ---
    async def _plan_job(self, kind: str, body, caller: Caller) -> JobRecord:
        """The checks the synchronous route makes, then the job's record (not yet stored)."""
        now = time.time()
        common = dict(job_id=new_job_id(), kind=kind, request=body.model_dump(mode="json"), owner=caller.name,
                      request_id=new_request_id(), created_at=now, updated_at=now)
        if kind == "images":
            record = await self._record(body.subject_id, caller)
            await self._check(body.prompts, record.subjects, subjects_checked=True)
            check_seeds(body.seeds, body.prompts)
            await asyncio.to_thread(decode_uploads, body, 0, self.settings)
            return JobRecord(**common, subject_id=body.subject_id, images_total=len(body.prompts))
        n_anchors = len(body.prompts) if kind == "subject" else self._story_anchors(body)
        await self._check(body.prompts, body.subjects)
        request_config(body, n_anchors, self.settings)
        await asyncio.to_thread(decode_uploads, body, n_anchors, self.settings)
        total = n_anchors if kind == "subject" else len(body.prompts)
        return JobRecord(**common, subject_id=new_subject_id(), n_anchors=n_anchors,
                         seed=first_seed(body.seed, len(body.prompts)), images_total=total)

    async def _earlier_job(self, marker: str, caller: Caller) -> JobOut:
        """The job an Idempotency-Key already made (its record may be a moment from stored)."""
        job_id = (await asyncio.to_thread(self.store.get, marker)).decode()
        for _ in range(50):
            try:
                return await self._job_out(await asyncio.to_thread(load_job, self.store, job_id))
            except UnknownJob:
                await asyncio.sleep(0.1)
        return await self._job_out(await self._job(job_id, caller))

    def _save_new_job(self, job: JobRecord) -> None:
        count_job("queued")
        append_event(self.store, job, "status", {"status": "queued"})
        save_new_job(self.store, job)
        self.store.put(active_key(job.job_id), b"", "application/octet-stream")

    def _start_job(self, job: JobRecord) -> None:
        runner = JobRunner(self, job, self._replica)
        self._runners[job.job_id] = runner
        task = asyncio.ensure_future(runner.run())
        task.add_done_callback(lambda _: self._runners.pop(job.job_id, None))

    async def _sweep_jobs(self) -> None:
        """Takes over jobs whose runner stopped renewing its lease (its replica died)."""
        while True:
            await asyncio.sleep(JOB_SWEEP_S)
            try:
                active = await asyncio.to_thread(lambda: [a.key.split("/")[1] for a in self.store.list_prefix("active-jobs/")])
                for job_id in active:
                    if job_id in self._runners or not await asyncio.to_thread(take_lease, self.store, job_id, self._replica):
                        continue
                    job = await asyncio.to_thread(load_job, self.store, job_id)
                    if job.finished:
                        await asyncio.to_thread(self.store.delete_prefix, active_key(job_id))
                        continue
                    logger.info("taking over job %s (its runner stopped)", job_id)
                    self._start_job(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("job sweep failed; retrying")

    async def _job(self, job_id: str, caller: Caller) -> JobRecord:
        try:
            job = await asyncio.to_thread(load_job, self.store, job_id)
        except UnknownJob as error:
            raise HTTPException(status_code=404, detail=str(error)) from None
        if not caller.may_see(job.owner):
            raise HTTPException(status_code=404, detail=str(UnknownJob(job_id)))
        return job

    async def _job_out(self, job: JobRecord) -> JobOut:
        base = f"{(self.settings.public_base_url or '').rstrip('/')}/v1/jobs/{job.job_id}"
        out = JobOut(
            job_id=job.job_id, kind=job.kind, status=job.status, subject_id=job.subject_id,
            created_at=job.created_at, updated_at=job.updated_at,
            progress={"images_done": job.images_done, "images_total": job.images_total,
                      "running": [r.model_dump() for r in job.running]},
            status_url=base, events_url=base + "/events",
            cancel_requested=(not job.finished) and await asyncio.to_thread(cancel_requested, self.store, job.job_id),
        )
        if job.status == "succeeded":
            fmt = job.request.get("response_format", "url")
            images = [await self.public_image(e, fmt) for e in sorted(job.images, key=lambda e: e["index"])]
            out.result = ImagesResponse(subject_id=job.subject_id, images=images, timings={})
        if job.error is not None:
            out.error, out.error_status = {"detail": job.error["detail"]}, job.error["status"]
        return out

    async def _event_stream(self, job_id: str, last: int, request: Request):
        quiet = 0.0
        while True:
            events = await asyncio.to_thread(events_after, self.store, job_id, last)
            for event in events:
                last = event["id"]
                yield f"id: {last}\nevent: {event['event']}\ndata: {json.dumps(event['data'])}\n\n"
                if event["event"] == "status" and event["data"].get("status") in FINISHED:
                    return
            if not events:
                job = await asyncio.to_thread(load_job, self.store, job_id)
                if job.finished and last >= job.events - 1:
                    return
                quiet += EVENT_POLL_S
                if quiet >= 15:
                    quiet = 0.0
                    yield ": keep-alive\n\n"  # proxies close idle connections
            if await request.is_disconnected():
                return
            await asyncio.sleep(EVENT_POLL_S)

    # --- used by job runners ---
    def job_plan(self, job: JobRecord):
        body = (StoryRequest if job.kind == "story" else SubjectRequest).model_validate(job.request)
        return body.prompts, job.n_anchors, job.seed, request_config(body, job.n_anchors, self.settings)

    def job_uploads(self, job: JobRecord) -> Uploads:
        """The job's photos and controls, decoded again from its stored request (checked when
        it was accepted)."""
        kinds = {"story": StoryRequest, "subject": SubjectRequest, "images": ImagesRequest}
        body = kinds[job.kind].model_validate({k: v for k, v in job.request.items() if k != "subject_id"})
        return decode_uploads(body, job.n_anchors or 0, self.settings)

    async def owned_record(self, subject_id: str, owner: Optional[str]) -> SubjectRecord:
        return await self._record(subject_id, Caller(name=owner, admin=owner is None))

    async def store_job_image(self, job: JobRecord, index: int, prompt: str, seed: int, png: bytes) -> dict:
        entry = image_entry(job, index, prompt, seed)
        await self._put_image(entry["key"], png)
        return entry

    async def public_image(self, entry: dict, response_format: str) -> dict:
        out = {k: entry[k] for k in ("index", "prompt", "seed")}
        if response_format == "b64_json":
            out["b64_json"] = to_b64(await asyncio.to_thread(self.store.get, entry["key"]))
        else:
            out["url"] = await self._url(entry["key"])
        return out

    # --- steps ---
    def _story_anchors(self, body: StoryRequest) -> int:
        n_anchors = body.n_anchors or min(self.settings.defaults.n_anchors, len(body.prompts))
        if n_anchors > len(body.prompts):
            raise unprocessable(
                f"n_anchors is {n_anchors} but only {len(body.prompts)} prompts were given; the first n_anchors "
                "prompts are the anchors, so give at least that many prompts or lower n_anchors"
            )
        return n_anchors

    async def _check(self, prompts: list[str], subjects: list[str], subjects_checked: bool = False) -> None:
        """Every check that needs no model, off the event loop: limits, text, subject words, and
        the library's own token match with the model's tokenizer."""

        def run() -> None:
            if not subjects_checked:
                check_subjects(subjects, self.settings)
            check_prompts(prompts, subjects, self.settings)
            check_subject_tokens(self._tokenizer, prompts, subjects)

        await asyncio.to_thread(run)

    async def _record(self, subject_id: str, caller: Caller) -> SubjectRecord:
        """The record if the caller may see it; another key's subject is as unknown as a missing one."""
        try:
            record = await asyncio.to_thread(load_record, self.store, subject_id)
        except UnknownSubject as error:
            raise _not_found(error) from None
        if not caller.may_see(record.owner):
            raise _not_found(UnknownSubject(subject_id))
        return record

    async def _claim(self, caller: Caller, subject_id: str) -> None:
        limit = caller.key.max_subjects if caller.key is not None else None
        try:
            await asyncio.to_thread(claim_subject, self.store, caller.name, subject_id, limit)
        except OverQuota as error:
            raise HTTPException(status_code=429, detail=str(error),
                                headers={"Retry-After": str(max(1, int(self.settings.retry_after_s)))}) from None

    def _forgotten_on_failure(self, subject_id: str, owner: Optional[str]):
        return _ForgetOnFailure(self, subject_id, owner)

    async def _anchors(self, subject_id: str, prompts: list[str], subjects: list[str], seed: int, config,
                       owner: Optional[str], uploads: Optional[dict] = None) -> "AnchorsResult":
        made = asyncio.ensure_future(call(
            lambda: self.anchor_stage.create.remote(subject_id, prompts, subjects, seed, config.to_dict(), owner,
                                                    **(uploads or {})),
            "anchor stage",
            self.settings.retry_after_s,
        ))
        started = time.perf_counter()
        try:
            # Shielded: a client that leaves does not stop the anchors halfway through persisting
            # them (which would leave a subject whose id nobody has); they finish, then go.
            result: AnchorsResult = await asyncio.shield(made)
        except asyncio.CancelledError:
            asyncio.ensure_future(self._forget_when_done(made, subject_id, owner))
            raise
        elapsed = time.perf_counter() - started
        observe_stage("anchors", elapsed)
        count_images("anchor", len(result.pngs))
        self.refs.put(subject_id, result.cache)
        result.timings["anchors_call_s"] = elapsed
        return result

    async def _forget_when_done(self, made: "asyncio.Future", subject_id: str, owner: Optional[str]) -> None:
        try:
            await made
        except BaseException:
            pass  # a failed anchor batch persists nothing (the AnchorStage cleans up after itself)
        try:
            await asyncio.to_thread(release_subject, self.store, owner, subject_id)
        except Exception:
            logger.exception("could not remove subject %s after its client left", subject_id)

    async def _new_image(self, subject_id: str, request_id: str, index: int, prompt: str, seed: int,
                         response_format: str, control: Optional[dict] = None) -> ImageOut:
        cache = self.refs.get(subject_id)
        handle = self.generator.options(multiplexed_model_id=subject_id)
        result: ImageResult = await call(
            lambda: handle.generate.remote(cache, prompt, seed, **(control or {})), "generator", self.settings.retry_after_s
        )
        count_images("new")
        if cache is not None and result.cache_source in ("artifact_store", "rebuilt"):
            self.refs.drop(subject_id)  # its owner is gone; later calls go to the store directly
        return await self._store_image(subject_id, request_id, index, prompt, result.seed, result.png, response_format)

    async def _store_image(self, subject_id: str, request_id: str, index: int, prompt: str, seed: int,
                           png: bytes, response_format: str) -> ImageOut:
        key = image_key(subject_id, request_id, index)
        await self._put_image(key, png)
        if response_format == "b64_json":
            return ImageOut(index=index, prompt=prompt, seed=seed, b64_json=to_b64(png))
        return ImageOut(index=index, prompt=prompt, seed=seed, url=await self._url(key))

    async def _put_image(self, key: str, png: bytes) -> None:
        started = time.perf_counter()
        await asyncio.to_thread(self.store.put, key, png, "image/png")
        observe_stage("store", time.perf_counter() - started)

    def _collect_forever(self) -> None:
        """Retention, in the background: each replica looks every few minutes, and the one that
        gets the store's lease collects (at most once per `retention.interval_s`)."""
        policy = self.settings.retention
        while True:
            try:
                collect_if_due(self.store, policy, self._replica)
            except Exception:
                logger.exception("retention collector failed; retrying at the next interval")
            time.sleep(min(policy.interval_s, 300.0))

    def _shared_signing_key(self) -> bytes:
        """One key for every Ingress replica, made by the first to start: a URL signed by one
        replica must open on any other behind the same load balancer."""
        if not isinstance(self.store, LocalArtifactStore):
            return secrets.token_hex(32).encode()  # unused: S3 presigns its own URLs
        if self.store.create_exclusive(SIGNING_KEY, secrets.token_hex(32).encode(), "text/plain"):
            os.chmod(self.store.path(SIGNING_KEY), 0o600)
        return self.store.get(SIGNING_KEY)

    async def _url(self, key: str) -> str:
        expires = self.settings.url_expires_s
        if isinstance(self.store, LocalArtifactStore):
            return signed_url(self._signing_key, self.settings.public_base_url, ARTIFACTS, key, expires)
        # Presigning can refresh credentials over the network: keep it off the event loop.
        return await asyncio.to_thread(self.store.url, key, expires)
