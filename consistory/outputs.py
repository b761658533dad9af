"""What the entry points return."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cache.anchor_cache import AnchorCache


@dataclass
class StoryOutput:
    """Images in prompt order (PIL images, or a float array (B, H, W, 3) in [0, 1] for "np"),
    the seed of each image, each image's final subject mask on the coarse grid (numpy bool
    (h/4, w/4)), and wall-clock timings in seconds."""

    images: Any
    seeds: list[int]
    subject_masks: list[Any]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class AnchorsOutput(StoryOutput):
    """A `StoryOutput` of the anchors, plus the anchor cache that new images are made from."""

    cache: "AnchorCache | None" = None
