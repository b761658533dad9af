"""What routes answer: the error answers each can give, as OpenAPI documents them (so generated
clients know them; every error body is `{"detail": "<one sentence>"}`, made by errors.py), and
the images of a request."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from ..flow.image_links import ImageLinks
from ..flow.plans import MadeImage, Plan
from ..flow.story_flow import StoryFlow
from .schemas import ErrorOut, ImageOut, ImagesResponse

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}

ERRORS: dict[int, dict[str, Any]] = {
    401: {
        "description": "No API key, or an unknown one: send `Authorization: Bearer <key>`.",
        "headers": {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    },
    403: {"description": "The image URL's signature is wrong or has expired; ask for the image again."},
    404: {"description": "No such subject, job or image (never made, deleted, past its retention, or another key's)."},
    408: {"description": "The request body came more slowly than the service's minimum rate."},
    409: {"description": "The subject was made with another model than the one this service runs."},
    413: {"description": "The request body is larger than the service accepts."},
    422: {"description": "The request is invalid; `detail` names the field and how to fix it."},
    429: {
        "description": "Over a limit of the API key. Its request rate, its event streams or its queued "
                       "jobs: Retry-After says when to retry. Its number of subjects: no Retry-After, since "
                       "waiting does not help; `detail` says to delete subjects first.",
        "headers": _RETRY_AFTER,
    },
    431: {"description": "The request's headers are larger than the service accepts."},
    503: {
        "description": "At capacity, a worker was lost, or the artifact store failed; retry after Retry-After.",
        "headers": _RETRY_AFTER,
    },
}


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that can answer these error codes."""
    return {code: {"model": ErrorOut, **ERRORS[code]} for code in codes}


async def answer(flow: StoryFlow, links: ImageLinks, plan: Plan, started: float,
                 max_subjects: Optional[int] = None) -> ImagesResponse:
    """A plan run while its client waits, answered as the synchronous routes answer."""
    outcome = await flow.answer(plan, max_subjects, started)
    return await images_response(links, outcome.subject_id, outcome.images, plan.response_format, outcome.timings)


async def images_response(links: ImageLinks, subject_id: str, images: Sequence[MadeImage], response_format: str,
                          timings: dict[str, float]) -> ImagesResponse:
    """The answer of every route that makes images (and a job's result): images in prompt order."""
    ordered = sorted(images, key=lambda image: image.index)
    outs = [ImageOut(**await links.public(image, response_format)) for image in ordered]
    return ImagesResponse(subject_id=subject_id, images=outs, timings=timings)
