"""Ingress: the v1 HTTP API (FastAPI), on a CPU with no model.

It validates requests, assigns subject ids, asks the AnchorStage for anchors, fans the other
prompts out over Generator replicas one image per call, stores every image before reporting it,
and answers with URLs or base64 PNGs in prompt order. Anchor caches pass through here only as
ObjectRefs; their bytes go from the AnchorStage to Generators through Ray's object store.
"""


import asyncio
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from .artifact_store import LocalArtifactStore, artifact_store_from_config
from .checks import check_prompts, check_seeds, check_subjects, first_seed, request_config
from .images import to_b64
from .messages import AnchorsResult, ImageResult
from .remote import CacheRefs, call, gather_in_order, unavailable
from .schemas import (
    DeletedOut,
    HealthOut,
    ImageOut,
    ImagesRequest,
    ImagesResponse,
    ReadyOut,
    StoryRequest,
    SubjectOut,
    SubjectRequest,
)
from .settings import ServiceSettings
from .subjects import (
    SubjectRecord,
    UnknownSubject,
    delete_subject as forget_subject,
    image_key,
    is_image_key,
    record_key,
    load_record,
    new_request_id,
    new_subject_id,
)

app = FastAPI(
    title="ConsiStory",
    version="1",
    description="Training-free consistent-subject image generation (ConsiStory on SDXL).",
)


@app.exception_handler(RequestValidationError)
async def _readable_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """One sentence per problem, naming the field, instead of FastAPI's nested error list."""
    problems = []
    for item in error.errors():
        loc = [str(part) for part in item.get("loc", ()) if part != "body"]
        if item.get("type") == "json_invalid":
            problems.append(
                "the request body is not valid JSON "
                f"({item.get('ctx', {}).get('error', 'decode error')}); send a JSON object "
                "with Content-Type: application/json"
            )
        elif item.get("type") == "model_attributes_type" or (not loc and item.get("type") == "dict_type"):
            problems.append(
                "the request body must be a JSON object sent with Content-Type: application/json, "
                "e.g. {\"prompts\": [...], \"subjects\": [...]}"
            )
        else:
            where = ".".join(loc) if loc else "body"
            problems.append(f"{where}: {item.get('msg')}")
    return JSONResponse(status_code=422, content={"detail": "; ".join(problems)})


def _not_found(error: UnknownSubject) -> HTTPException:
    return HTTPException(status_code=404, detail=str(error))


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, anchor_stage: DeploymentHandle, generator: DeploymentHandle, settings: dict[str, Any]) -> None:
        self.settings = ServiceSettings.model_validate(settings)
        self.anchor_stage = anchor_stage
        self.generator = generator
        self.store = artifact_store_from_config(self.settings.store)
        self.refs = CacheRefs(self.settings.ingress_cache_refs)
        self._ready: ReadyOut | None = None

    # --- probes ---
    @app.get("/healthz", response_model=HealthOut)
    async def healthz(self) -> HealthOut:
        return HealthOut(status="ok")

    @app.get("/readyz", response_model=ReadyOut)
    async def readyz(self) -> ReadyOut:
        """Ready once both model deployments have answered, i.e. loaded their model.

        The first positive answer is kept: models never unload, and asking again through their
        request queues would report "not ready" exactly when they are busiest.
        """
        if self._ready is not None:
            return self._ready
        timeout = self.settings.ready_timeout_s
        try:
            anchor, generator = await asyncio.wait_for(
                asyncio.gather(self.anchor_stage.ready.remote(), self.generator.ready.remote()), timeout
            )
        except Exception as error:  # not ready, whatever the reason; the probe says which
            raise unavailable(f"models not ready: {type(error).__name__}: {error}", self.settings.retry_after_s)
        self._ready = ReadyOut(
            status="ready",
            model=self.settings.model_id,
            store=self.store.describe(),
            replicas={"anchor_stage": anchor, "generator": generator},
        )
        return self._ready

    # --- v1 API ---
    @app.post("/v1/stories", response_model=ImagesResponse, response_model_exclude_none=True)
    async def create_story(self, body: StoryRequest, request: Request) -> ImagesResponse:
        """The whole story: anchors first, the other prompts fanned out; images in prompt order."""
        started = time.perf_counter()
        check_subjects(body.subjects, self.settings)
        check_prompts(body.prompts, body.subjects, self.settings)
        n_anchors = min(body.n_anchors or self.settings.defaults.n_anchors, len(body.prompts))
        config = request_config(body, n_anchors, self.settings)
        seed = first_seed(body.seed, len(body.prompts))
        subject_id, request_id = new_subject_id(), new_request_id()

        anchors = await self._anchors(subject_id, body.prompts[:n_anchors], body.subjects, seed, config)
        anchors_done = time.perf_counter()
        first_new: list[float] = []

        async def new_image(index: int) -> ImageOut:
            image = await self._new_image(
                subject_id, request_id, index, body.prompts[index], seed + index, body.response_format, request
            )
            first_new.append(time.perf_counter())
            return image

        stored = [
            self._store_image(subject_id, request_id, i, body.prompts[i], anchors.seeds[i], png,
                              body.response_format, request)
            for i, png in enumerate(anchors.pngs)
        ]
        images = await gather_in_order(stored + [new_image(i) for i in range(n_anchors, len(body.prompts))])
        done = time.perf_counter()
        timings = {
            **anchors.timings,
            "anchors_s": anchors_done - started,
            "images_s": done - anchors_done,
            "total_s": done - started,
        }
        if first_new:
            timings["first_image_s"] = min(first_new) - started
        return ImagesResponse(subject_id=subject_id, images=images, timings=timings)

    @app.post("/v1/subjects", response_model=ImagesResponse, response_model_exclude_none=True)
    async def create_subject(self, body: SubjectRequest, request: Request) -> ImagesResponse:
        """A reusable subject from its anchor prompts; answers its id and the anchor images."""
        started = time.perf_counter()
        check_subjects(body.subjects, self.settings)
        check_prompts(body.prompts, body.subjects, self.settings)
        config = request_config(body, len(body.prompts), self.settings)
        seed = first_seed(body.seed, len(body.prompts))
        subject_id, request_id = new_subject_id(), new_request_id()
        anchors = await self._anchors(subject_id, body.prompts, body.subjects, seed, config)
        images = await gather_in_order(
            self._store_image(
                subject_id, request_id, i, prompt, anchors.seeds[i], png, body.response_format, request
            )
            for i, (prompt, png) in enumerate(zip(body.prompts, anchors.pngs))
        )
        timings = {**anchors.timings, "total_s": time.perf_counter() - started}
        return ImagesResponse(subject_id=subject_id, images=images, timings=timings)

    @app.get("/v1/subjects/{subject_id}", response_model=SubjectOut)
    async def get_subject(self, subject_id: str) -> SubjectRecord:
        return await self._record(subject_id)

    @app.post("/v1/subjects/{subject_id}/images", response_model=ImagesResponse, response_model_exclude_none=True)
    async def create_images(self, subject_id: str, body: ImagesRequest, request: Request) -> ImagesResponse:
        """New images of an existing subject; default seeds continue the anchors'."""
        started = time.perf_counter()
        record = await self._record(subject_id)
        if record.model != self.settings.model_id:
            raise HTTPException(
                status_code=409,
                detail=f"subject {subject_id} was made with model {record.model!r} but this service runs "
                f"{self.settings.model_id!r}; create the subject again with POST /v1/subjects",
            )
        check_prompts(body.prompts, record.subjects, self.settings)
        check_seeds(body.seeds, body.prompts)
        seeds = list(body.seeds) if body.seeds is not None else record.default_seeds(len(body.prompts))
        request_id = new_request_id()
        checked = time.perf_counter()
        images = await gather_in_order(
            self._new_image(subject_id, request_id, j, prompt, seeds[j], body.response_format, request)
            for j, prompt in enumerate(body.prompts)
        )
        if not await asyncio.to_thread(self.store.exists, record_key(subject_id)):
            # Deleted while its images were being made: leave nothing behind, report it gone.
            await asyncio.to_thread(self.store.delete_prefix, image_key(subject_id, request_id, 0).rsplit("/", 1)[0] + "/")
            raise HTTPException(status_code=404, detail=f"subject {subject_id} was deleted while its images were made")
        done = time.perf_counter()
        timings = {"images_s": done - checked, "total_s": done - started}
        return ImagesResponse(subject_id=subject_id, images=images, timings=timings)

    @app.delete("/v1/subjects/{subject_id}", response_model=DeletedOut)
    async def delete_subject(self, subject_id: str) -> DeletedOut:
        """Forget the subject: its record, cache and images. Generators drop their copies as
        their LRUs turn over; nothing can reach them by this id any more."""
        try:
            await asyncio.to_thread(forget_subject, self.store, subject_id)
        except UnknownSubject as error:
            raise _not_found(error) from None
        self.refs.drop(subject_id)
        return DeletedOut(subject_id=subject_id, deleted=True)

    @app.get("/v1/artifacts/{key:path}", response_class=FileResponse)
    async def artifact(self, key: str) -> FileResponse:
        """Images of the local artifact store (the URLs it hands out point here)."""
        if not is_image_key(key):
            raise HTTPException(status_code=404, detail=f"no image {key!r}: only stored images are served here")
        if not isinstance(self.store, LocalArtifactStore):
            raise HTTPException(status_code=404, detail="artifacts are in S3 here; use the presigned 'url' of an image")
        try:
            path = self.store.path(key)
        except ValueError as error:
            raise HTTPException(status_code=404, detail=f"no artifact {key!r}: {error}") from None
        if not path.is_file():
            raise HTTPException(status_code=404, detail=f"no artifact {key!r}")
        return FileResponse(path)

    # --- steps ---
    async def _record(self, subject_id: str) -> SubjectRecord:
        try:
            return await asyncio.to_thread(load_record, self.store, subject_id)
        except UnknownSubject as error:
            raise _not_found(error) from None

    async def _anchors(
        self, subject_id: str, prompts: list[str], subjects: list[str], seed: int, config
    ) -> AnchorsResult:
        result: AnchorsResult = await call(
            lambda: self.anchor_stage.create.remote(subject_id, prompts, subjects, seed, config.to_dict()),
            "anchor stage",
            self.settings.retry_after_s,
        )
        self.refs.put(subject_id, result.cache)
        return result

    async def _new_image(self, subject_id: str, request_id: str, index: int, prompt: str, seed: int,
                         response_format: str, request: Request) -> ImageOut:
        cache = self.refs.get(subject_id)
        handle = self.generator.options(multiplexed_model_id=subject_id)
        result: ImageResult = await call(
            lambda: handle.generate.remote(cache, prompt, seed), "generator", self.settings.retry_after_s
        )
        if cache is not None and result.cache_source in ("artifact_store", "rebuilt"):
            self.refs.drop(subject_id)  # its owner is gone; later calls go to the store directly
        return await self._store_image(subject_id, request_id, index, prompt, result.seed, result.png,
                                       response_format, request)

    async def _store_image(self, subject_id: str, request_id: str, index: int, prompt: str, seed: int,
                           png: bytes, response_format: str, request: Request) -> ImageOut:
        key = image_key(subject_id, request_id, index)
        await asyncio.to_thread(self.store.put, key, png, "image/png")
        if response_format == "b64_json":
            return ImageOut(index=index, prompt=prompt, seed=seed, b64_json=to_b64(png))
        # Presigning can refresh credentials over the network: keep it off the event loop.
        url = self._absolute(await asyncio.to_thread(self.store.url, key, self.settings.url_expires_s), request)
        return ImageOut(index=index, prompt=prompt, seed=seed, url=url)

    @staticmethod
    def _absolute(url: str, request: Request) -> str:
        """Local-store URLs are paths on this service; give clients the full address."""
        if url.startswith("/"):
            return str(request.base_url).rstrip("/") + url
        return url

