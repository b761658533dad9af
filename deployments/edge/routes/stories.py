"""POST /v1/stories: a whole story, anchors first, the other prompts fanned out."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from ..access import current_caller
from ..api_keys import Caller
from ..responses import answer, documented
from ..schemas import ImagesResponse, StoryRequest
from ..services import Services, services

router = APIRouter()


@router.post("/v1/stories", response_model=ImagesResponse, response_model_exclude_none=True,
             responses=documented(401, 408, 413, 422, 429, 503))
async def create_story(body: StoryRequest, caller: Caller = Depends(current_caller),
                       svc: Services = Depends(services)) -> ImagesResponse:
    """The whole story: anchors first, the other prompts fanned out; images in prompt order."""
    started = time.perf_counter()
    plan = await svc.planner.story(body, caller)
    return await answer(svc.flow, svc.links, plan, started, caller.max_subjects)
