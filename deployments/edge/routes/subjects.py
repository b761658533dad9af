"""Subjects: made from anchor prompts, listed, read and deleted (new images: images.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Optional

from fastapi import APIRouter, Depends, Query
from pydantic import BeforeValidator

from ...flow.subjects import SubjectRecord, all_subject_ids, owned_subject_ids
from ..access import current_caller
from ..api_keys import Caller
from ...numbers import digits_only
from ..responses import answer, documented
from ..schemas import DeletedOut, ImagesResponse, SubjectListOut, SubjectOut, SubjectRequest
from ..services import Services, services

router = APIRouter()


@router.post("/v1/subjects", response_model=ImagesResponse, response_model_exclude_none=True,
             responses=documented(401, 408, 413, 422, 429, 503))
async def create_subject(body: SubjectRequest, caller: Caller = Depends(current_caller),
                         svc: Services = Depends(services)) -> ImagesResponse:
    """A reusable subject from its anchor prompts; answers its id and the anchor images."""
    started = time.perf_counter()
    plan = await svc.planner.story(body, caller)
    return await answer(svc.flow, svc.links, plan, started, caller.max_subjects)


@router.get("/v1/subjects", response_model=SubjectListOut, response_model_exclude_none=True,
            responses=documented(401, 422, 429, 503))
async def list_subjects(limit: Annotated[int, BeforeValidator(digits_only(4)), Query(ge=1, le=1000)] = 100,
                        after: Optional[str] = None,
                        caller: Caller = Depends(current_caller), svc: Services = Depends(services)) -> SubjectListOut:
    """The caller's subjects (every subject for an admin key, or with auth off), by id."""
    if caller.admin:
        ids = await asyncio.to_thread(all_subject_ids, svc.store)
    else:
        ids = await asyncio.to_thread(owned_subject_ids, svc.store, caller.name)
    ids = sorted(i for i in ids if after is None or i > after)
    page = ids[:limit]
    return SubjectListOut(subject_ids=page, next_after=page[-1] if len(ids) > limit else None)


@router.get("/v1/subjects/{subject_id}", response_model=SubjectOut, responses=documented(401, 404, 422, 429, 503))
async def get_subject(subject_id: str, caller: Caller = Depends(current_caller),
                      svc: Services = Depends(services)) -> SubjectRecord:
    return await svc.planner.record(subject_id, caller)


@router.delete("/v1/subjects/{subject_id}", response_model=DeletedOut, responses=documented(401, 404, 422, 429, 503))
async def delete_subject(subject_id: str, caller: Caller = Depends(current_caller),
                         svc: Services = Depends(services)) -> DeletedOut:
    """Forget the subject: its record, cache and images. Generators drop their copies as
    their LRUs turn over; nothing can reach them by this id any more."""
    await svc.planner.record(subject_id, caller)
    await svc.flow.forget(subject_id)
    return DeletedOut(subject_id=subject_id, deleted=True)
