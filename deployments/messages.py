"""What crosses between the deployments, as small typed records: one request object per call,
one result object back, and the library's own `StepProgress` for each denoising step of a
streamed call.

Ray serializes these with the call; ObjectRefs inside them travel as references (the caller
lends them), so a cache's bytes never pass through the process that only forwards its handle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from consistory.config import ConsiStoryConfig
from consistory.progress import StepProgress

DEFAULT_CONTROL_SCALE = 1.0  # the library's default controlnet_conditioning_scale

# A PNG of the RGB pixels per entry, or None where that prompt has none.
Pngs = tuple[Optional[bytes], ...]


@dataclass(frozen=True)
class CacheHandle:
    """An anchor cache in Ray's object store: an ObjectRef to its safetensors header and one per
    chunk of its data section, each chunk at most `cache_chunk_bytes`. A reader on the same node
    maps the chunks where they lie; another node pulls each object once."""

    header: Any  # ray.ObjectRef of a read-only numpy uint8 array
    chunks: tuple[Any, ...]  # ray.ObjectRef of a read-only numpy uint8 array
    nbytes: int


@dataclass(frozen=True)
class AnchorRequest:
    """One anchor batch for a new subject: `AnchorStage.create` / `create_stream`.

    Anchor i gets seed `seed + i`. `photos` (one per anchor prompt) are photo anchors and
    `controls` (one per anchor prompt) ControlNet controls, each a PNG or None; the AnchorStage
    stores them with the subject's record, which is what a rebuild needs besides the prompts."""

    subject_id: str
    prompts: tuple[str, ...]
    subjects: tuple[str, ...]
    seed: int
    config: ConsiStoryConfig
    owner: Optional[str] = None  # the API key's name the subject belongs to (None with auth off)
    photos: Optional[Pngs] = None
    controls: Optional[Pngs] = None
    control_scale: float = DEFAULT_CONTROL_SCALE


@dataclass(frozen=True)
class ImageRequest:
    """One new image of an existing subject: `Generator.generate` / `generate_stream`, called
    with `multiplexed_model_id=subject_id` so that it reaches a replica holding the cache.

    Everything that differs between images of one subject is per image here (prompt, seed,
    control), and what they share is keyed by `batch_key`: requests with the same key can be
    made by one `generate_from_anchors` call on lists of prompts, seeds and controls, since
    each image of such a call is independent of the others."""

    subject_id: str
    prompt: str
    seed: int
    control: Optional[bytes] = None  # PNG of a ControlNet control for this image
    control_scale: float = DEFAULT_CONTROL_SCALE  # only used with a control
    cache: Optional[CacheHandle] = None  # where the caller saw the cache last; None: the store

    @property
    def batch_key(self) -> tuple[str, Optional[float]]:
        """The subject, and the control scale where there is a control: one call takes one scale."""
        return self.subject_id, (self.control_scale if self.control is not None else None)


@dataclass
class AnchorsResult:
    pngs: list[bytes]
    seeds: list[int]
    cache: CacheHandle
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ImageResult:
    png: bytes
    seed: int
    cache_source: str  # "replica", "object_store", "artifact_store" or "rebuilt"
    timings: dict[str, float] = field(default_factory=dict)
    batch_images: int = 1  # images of the `generate_from_anchors` call that made it


# What a streamed call yields: a StepProgress per denoising step, then its one result.
AnchorStreamItem = Union[StepProgress, AnchorsResult]
ImageStreamItem = Union[StepProgress, ImageResult]
