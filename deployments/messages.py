"""What crosses between the deployments, as small typed records.

Ray serializes these with the call; ObjectRefs inside them travel as references (the caller
lends them), so a cache's bytes never pass through the process that only forwards its handle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CacheHandle:
    """An anchor cache in Ray's object store: an ObjectRef to its safetensors header and one per
    chunk of its data section, each chunk at most `cache_chunk_bytes`. A reader on the same node
    maps the chunks where they lie; another node pulls each object once."""

    header: Any  # ray.ObjectRef of a read-only numpy uint8 array
    chunks: tuple[Any, ...]  # ray.ObjectRef of a read-only numpy uint8 array
    nbytes: int


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
