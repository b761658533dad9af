"""From a request body to a `Plan`: every check that needs no model, made once, off the event loop.

The synchronous routes and POST /v1/jobs plan the same way; a job's runner only reads the plan.
Checks: limits, text, subject words and the library's own token match with the model's
tokenizer, the sampling settings against the configured limits, seeds, the uploaded images
(decoded here, once), and for new images of a subject: that the caller may see it and that it
was made with the model this service runs.
"""

from __future__ import annotations

import asyncio
from typing import Optional, Union

from consistory.loading import load_tokenizer

from ..artifact_store import ArtifactStore
from ..errors import ServiceError, not_found, unprocessable
from ..flow.plans import Plan
from ..flow.subjects import SubjectRecord, UnknownSubject, load_record, new_request_id, new_subject_id
from ..settings import ServiceSettings
from .api_keys import Caller
from .checks import (
    check_continued_seeds,
    check_prompts,
    check_seeds,
    check_subject_tokens,
    check_subjects,
    first_seed,
    request_config,
)
from .schemas import ImagesRequest, StoryRequest, SubjectRequest
from .uploads import decode_uploads

class Planner:
    def __init__(self, settings: ServiceSettings, store: ArtifactStore) -> None:
        self.settings, self.store = settings, store
        # For the token check only: where there is none (no files here), the model replicas
        # token-check the prompts themselves.
        self.tokenizer = load_tokenizer(settings.model)

    async def story(self, body: Union[StoryRequest, SubjectRequest], caller: Caller) -> Plan:
        """A story (its first n_anchors prompts are the anchors) or a subject (all of them are)."""
        return await asyncio.to_thread(self._story, body, caller)

    async def images(self, subject_id: str, body: ImagesRequest, caller: Caller) -> Plan:
        """New images of a subject the caller may see; default seeds continue the anchors'."""
        record = await self.record(subject_id, caller)
        return await asyncio.to_thread(self._images, record, body, caller)

    async def record(self, subject_id: str, caller: Caller) -> SubjectRecord:
        """The record if the caller may see it; another key's subject is as unknown as a missing one."""
        try:
            record = await asyncio.to_thread(load_record, self.store, subject_id)
        except UnknownSubject as error:
            raise not_found(str(error)) from None
        if not caller.may_see(record.owner):
            raise not_found(str(UnknownSubject(subject_id)))
        return record

    def _story(self, body: Union[StoryRequest, SubjectRequest], caller: Caller) -> Plan:
        prompts = body.prompts
        n_anchors = self._n_anchors(body) if isinstance(body, StoryRequest) else len(prompts)
        check_subjects(body.subjects, self.settings)
        self._check_prompts(prompts, body.subjects)
        config = request_config(body, n_anchors, self.settings)
        seed = first_seed(body.seed, len(prompts))
        return Plan(
            kind="story" if isinstance(body, StoryRequest) else "subject", subject_id=new_subject_id(),
            request_id=new_request_id(), owner=caller.name, prompts=tuple(prompts),
            seeds=tuple(seed + i for i in range(len(prompts))), response_format=body.response_format,
            uploads=decode_uploads(body, n_anchors, self.settings, (config.height, config.width)),
            subjects=tuple(body.subjects),
            n_anchors=n_anchors, config=config,
        )

    def _images(self, record: SubjectRecord, body: ImagesRequest, caller: Caller) -> Plan:
        if record.model != self.settings.model_id:
            raise ServiceError(
                409, f"subject {record.subject_id} was made with model {record.model!r} but this service runs "
                f"{self.settings.model_id!r}; create the subject again with POST /v1/subjects",
            )
        self._check_prompts(body.prompts, record.subjects)
        check_seeds(body.seeds, body.prompts)
        seeds = list(body.seeds) if body.seeds is not None else record.default_seeds(len(body.prompts))
        check_continued_seeds(seeds)
        return Plan(
            kind="images", subject_id=record.subject_id, request_id=new_request_id(), owner=caller.name,
            prompts=tuple(body.prompts), seeds=tuple(seeds), response_format=body.response_format,
            uploads=decode_uploads(body, 0, self.settings, (record.config["height"], record.config["width"])),
        )

    def _n_anchors(self, body: StoryRequest) -> int:
        n_anchors = body.n_anchors or min(self.settings.defaults.n_anchors, len(body.prompts))
        if n_anchors > len(body.prompts):
            raise unprocessable(
                f"n_anchors is {n_anchors} but only {len(body.prompts)} prompts were given; the first n_anchors "
                "prompts are the anchors, so give at least that many prompts or lower n_anchors"
            )
        return n_anchors

    def _check_prompts(self, prompts: list[str], subjects: list[str]) -> None:
        check_prompts(prompts, subjects, self.settings)
        check_subject_tokens(self.tokenizer, prompts, subjects)


def job_kind(given: dict[str, Optional[object]]) -> str:
    """The one kind of work a POST /v1/jobs body names."""
    kinds = [name for name, body in given.items() if body is not None]
    if len(kinds) != 1:
        raise unprocessable("give exactly one of story, subject or images (the body of the synchronous "
                            f"route); got {kinds or 'none'}")
    return kinds[0]
