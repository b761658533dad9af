"""A request, planned: everything the story flow needs, checked and decoded once.

The edge turns a validated request body into a `Plan` (ids assigned, seeds and the config
resolved, uploaded images decoded to PNG); the synchronous routes run it at once, a job stores it
and its runner reads it back. A plan is one of three kinds:

  story    anchors (the first `n_anchors` prompts), then the other prompts from their cache
  subject  anchors only (every prompt is an anchor)
  images   new images of an existing subject (no anchors)

Prompt i gets seed `seeds[i]`; anchor i's seed is `seeds[0] + i`, as the library numbers them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from consistory.config import ConsiStoryConfig
from pydantic import BaseModel, Field

from ..artifact_store import ArtifactStore
from ..messages import DEFAULT_CONTROL_SCALE, Pngs
from .inputs import StoredImage, load_inputs, store_inputs

PlanKind = Literal["story", "subject", "images"]


@dataclass(frozen=True)
class Uploads:
    """A request's decoded images; None where none were sent."""

    photos: Optional[Pngs] = None  # one per anchor prompt
    controls: Optional[Pngs] = None  # one per prompt of the request
    control_scale: float = DEFAULT_CONTROL_SCALE

    def anchor_controls(self, n_anchors: int) -> Optional[Pngs]:
        controls = self.controls[:n_anchors] if self.controls is not None else None
        return controls if controls is not None and any(c is not None for c in controls) else None

    def control(self, index: int) -> Optional[bytes]:
        return self.controls[index] if self.controls is not None else None


@dataclass(frozen=True)
class Plan:
    kind: PlanKind
    subject_id: str
    request_id: str  # names the images' folder: a plan run again overwrites rather than duplicates
    owner: Optional[str]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]  # one per prompt
    response_format: str = "url"
    uploads: Uploads = field(default_factory=Uploads)
    # story and subject plans: the subject words, how many prompts are anchors, the config
    subjects: tuple[str, ...] = ()
    n_anchors: int = 0
    config: Optional[ConsiStoryConfig] = None

    @property
    def makes_subject(self) -> bool:
        return self.kind != "images"

    def to_json(self, store: ArtifactStore, prefix: str) -> dict[str, Any]:
        """The plan as JSON, its images stored as PNGs under `prefix` (never base64 in JSON)."""
        photos = store_inputs(store, prefix, "photo", self.uploads.photos)
        controls = store_inputs(store, prefix, "control", self.uploads.controls)
        return {
            "kind": self.kind, "subject_id": self.subject_id, "request_id": self.request_id, "owner": self.owner,
            "prompts": list(self.prompts), "seeds": list(self.seeds), "response_format": self.response_format,
            "subjects": list(self.subjects), "n_anchors": self.n_anchors,
            "config": self.config.to_dict() if self.config is not None else None,
            "photos": _dump(photos), "controls": _dump(controls), "control_scale": self.uploads.control_scale,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], store: ArtifactStore) -> "Plan":
        uploads = Uploads(load_inputs(store, _load(data["photos"])), load_inputs(store, _load(data["controls"])),
                          data["control_scale"])
        config = ConsiStoryConfig.from_dict(data["config"]) if data["config"] is not None else None
        return cls(kind=data["kind"], subject_id=data["subject_id"], request_id=data["request_id"],
                   owner=data["owner"], prompts=tuple(data["prompts"]), seeds=tuple(data["seeds"]),
                   response_format=data["response_format"], uploads=uploads, subjects=tuple(data["subjects"]),
                   n_anchors=data["n_anchors"], config=config)


class MadeImage(BaseModel):
    """An image the flow stored: which prompt it is of, its seed and its key in the store."""

    index: int
    prompt: str
    seed: int
    key: str
    png: Optional[bytes] = Field(None, exclude=True)  # kept in memory for an answer in base64


def _dump(stored: Optional[list[Optional[StoredImage]]]) -> Optional[list[Optional[dict[str, str]]]]:
    return None if stored is None else [None if s is None else s.model_dump() for s in stored]


def _load(items: Optional[list[Optional[dict[str, str]]]]) -> Optional[list[Optional[StoredImage]]]:
    return None if items is None else [None if s is None else StoredImage(**s) for s in items]
