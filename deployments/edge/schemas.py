"""The v1 HTTP API's request and response bodies (field names as in the README, "The HTTP service (Ray Serve)").

Shape checks live here (types, signs, unknown fields); checks that depend on the service's
configured limits or on a stored subject live in `checks.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from consistory.seeds import MAX_SEED

from ..flow.subjects import SubjectRecord

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
ResponseFormat = Literal["url", "b64_json"]
# Hard caps of the request shape, whatever the configured limits (which `checks.py` applies and
# which are lower): they bound what a request can make the service parse and check.
Prompt = Annotated[str, Field(min_length=1, max_length=4000)]
Subject = Annotated[str, Field(min_length=1, max_length=400)]
MAX_LIST = 64

_PROMPTS = "Prompts, in order; each must contain at least one of the subject words."
_SUBJECTS = "Subject words or phrases kept consistent across images, e.g. [\"corgi\"]."
# An uploaded image in base64 (the body limit bounds it first; `limits.max_image_bytes` after).
B64Image = Annotated[str, Field(max_length=512 * 2**20)]
_IMAGES = ("Photo anchors: one entry per anchor prompt, a base64 PNG or JPEG of the subject that prompt "
           "describes, or null for an anchor generated from its prompt.")
_CONTROLS = ("ControlNet controls (pose, depth, edges): one entry per prompt, a base64 PNG or JPEG, or null "
             "for none. Only on a service with a ControlNet configured.")
_FORMAT = "\"url\" (default): each image as a URL; \"b64_json\": each image as base64 PNG."


class _Body(BaseModel):
    # A misspelt field ("prompt", "num_steps") is an error, not a silently used default; Infinity
    # and NaN are not numbers a request may carry; JSON says each value's type, so nothing is
    # coerced ("1" is not a seed, true is not 1, 1.5 is not a step count; 1 is a float).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class SamplingFields(_Body):
    """Optional sampling settings; where left out, the service's configured defaults apply."""

    seed: Optional[Seed] = Field(None, description="Image i gets seed + i; random when left out.")
    steps: Optional[int] = Field(None, ge=1, le=10_000, description="Denoising steps.")
    height: Optional[int] = Field(None, ge=1, le=100_000, description="Image height in pixels, a multiple of 8.")
    width: Optional[int] = Field(None, ge=1, le=100_000, description="Image width in pixels, a multiple of 8.")
    guidance_scale: Optional[float] = Field(None, ge=0, description="Classifier-free guidance scale (finite).")
    mask_dropout: Optional[float] = Field(None, ge=0, le=1, description="Subject-mask dropout of SDSA.")
    response_format: ResponseFormat = Field("url", description=_FORMAT)


class ControlFields(_Body):
    controls: Optional[list[Optional[B64Image]]] = Field(None, max_length=MAX_LIST, description=_CONTROLS)
    controlnet_conditioning_scale: Optional[float] = Field(
        None, ge=0, le=10, description="How strongly the controls steer the images (default 1.0)."
    )


class PhotoFields(ControlFields):
    images: Optional[list[Optional[B64Image]]] = Field(None, max_length=MAX_LIST, description=_IMAGES)


class StoryRequest(PhotoFields, SamplingFields):
    prompts: list[Prompt] = Field(..., min_length=1, max_length=MAX_LIST,
                                  description=_PROMPTS + " The first n_anchors are the anchors.")
    subjects: list[Subject] = Field(..., min_length=1, max_length=MAX_LIST, description=_SUBJECTS)
    n_anchors: Optional[int] = Field(None, ge=1, le=MAX_LIST,
                                     description="How many leading prompts are anchors (at most all of them).")


class SubjectRequest(PhotoFields, SamplingFields):
    prompts: list[Prompt] = Field(..., min_length=1, max_length=MAX_LIST, description="The anchor prompts. " + _PROMPTS)
    subjects: list[Subject] = Field(..., min_length=1, max_length=MAX_LIST, description=_SUBJECTS)


class ImagesRequest(ControlFields):
    prompts: list[Prompt] = Field(..., min_length=1, max_length=MAX_LIST, description=_PROMPTS)
    seeds: Optional[list[Seed]] = Field(
        None, max_length=MAX_LIST, description="One seed per prompt; by default they continue the anchors' seeds."
    )
    response_format: ResponseFormat = Field("url", description=_FORMAT)


class ImageOut(BaseModel):
    index: int
    prompt: str
    seed: int
    url: Optional[str] = None
    b64_json: Optional[str] = None


class ImagesResponse(BaseModel):
    subject_id: str
    images: list[ImageOut]
    timings: dict[str, float]


class SubjectOut(SubjectRecord):
    """The subject record: enough to regenerate its anchors bit for bit."""


class SubjectListOut(BaseModel):
    """Subject ids in id order: the caller's own, or every subject for an admin key."""

    subject_ids: list[str]
    next_after: Optional[str] = Field(None, description="Pass as `after` for the next page; absent on the last.")


class DeletedOut(BaseModel):
    subject_id: str
    deleted: bool


class ErrorOut(BaseModel):
    """Every error answer: one sentence saying what is wrong and what to do."""

    detail: str


class HealthOut(BaseModel):
    status: str


class ReadyOut(BaseModel):
    status: str
    model: str
    replicas: dict[str, dict]  # per model deployment: running replicas and Serve's status


class ImagesJobRequest(ImagesRequest):
    subject_id: str = Field(..., description="The subject to make new images of.")


class JobRequest(_Body):
    """Exactly one of: the body of POST /v1/stories, of POST /v1/subjects, or of
    POST /v1/subjects/{id}/images with the subject's id."""

    story: Optional[StoryRequest] = None
    subject: Optional[SubjectRequest] = None
    images: Optional[ImagesJobRequest] = None

    @model_validator(mode="before")
    @classmethod
    def _wrapped(cls, data: Any) -> Any:
        # The synchronous routes' body sent as it is: say how to wrap it, not "prompts: Extra inputs".
        if isinstance(data, dict) and not {"story", "subject", "images"} & set(data) and (
                {"prompts", "subjects", "subject_id"} & set(data)):
            raise PydanticCustomError("unwrapped_job", UNWRAPPED_JOB)
        return data


UNWRAPPED_JOB = ('a job body wraps the request in one key: {"story": <the body of POST /v1/stories>}, '
                 '{"subject": <the body of POST /v1/subjects>} or {"images": {"subject_id": ..., <the body of '
                 'POST /v1/subjects/{id}/images>}}')


class RunningImageOut(BaseModel):
    index: int
    pass_index: int = Field(..., description="1, or 2 for the pass with feature injection.")
    step: int = Field(..., description="The step just finished, 0-based.")
    steps: int


class JobProgress(BaseModel):
    images_done: int
    images_total: int
    running: list[RunningImageOut]


class JobOut(BaseModel):
    job_id: str
    kind: Literal["story", "subject", "images"]
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    subject_id: Optional[str] = None
    created_at: float
    updated_at: float
    progress: JobProgress
    status_url: str
    events_url: str
    cancel_requested: bool = False
    result: Optional[ImagesResponse] = Field(None, description="When succeeded, or cancelled after some images "
                                             "were made (those): as the synchronous route answers.")
    queue_position: Optional[int] = Field(None, description="While queued: how many jobs start before this one.")
    error: Optional[ErrorOut] = Field(None, description="When failed: what the synchronous route would have answered.")
    error_status: Optional[int] = None
