"""POST /v1/subjects/{id}/images: new images of an existing subject."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from ..access import current_caller
from ..api_keys import Caller
from ..responses import answer, documented
from ..schemas import ImagesRequest, ImagesResponse
from ..services import Services, services

router = APIRouter()


@router.post("/v1/subjects/{subject_id}/images", response_model=ImagesResponse, response_model_exclude_none=True,
             responses=documented(401, 404, 408, 409, 413, 422, 429, 503))
async def create_images(subject_id: str, body: ImagesRequest, caller: Caller = Depends(current_caller),
                        svc: Services = Depends(services)) -> ImagesResponse:
    """New images of an existing subject; default seeds continue the anchors'."""
    started = time.perf_counter()
    plan = await svc.planner.images(subject_id, body, caller)
    return await answer(svc.flow, svc.links, plan, started)
