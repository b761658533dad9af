"""Artifact store: bytes by key, on a local directory (the default) or S3.

The service keeps images, anchor caches and subject records here. Keys are
'/'-separated relative paths such as ``subjects/<id>/images/<request>/0.png``; the same key
means the same object on every implementation.

One concern per module: ``base`` (key rules, ``ArtifactNotFound``, the abstract
``ArtifactStore``), ``local`` (``LocalArtifactStore``), ``s3`` (``S3ArtifactStore``)
and ``config`` (``artifact_store_from_config`` and the environment variables it reads).
"""

from __future__ import annotations

# validate_key / validate_prefix: importable from here as before the split, though not in __all__.
from .base import (  # noqa: F401
    ArtifactNotFound,
    ArtifactStore,
    ArtifactStoreError,
    StoredArtifact,
    validate_key,
    validate_prefix,
)
from .config import artifact_store_from_config
from .local import LocalArtifactStore
from .s3 import S3ArtifactStore

__all__ = [
    "ArtifactNotFound",
    "ArtifactStore",
    "ArtifactStoreError",
    "LocalArtifactStore",
    "S3ArtifactStore",
    "artifact_store_from_config",
]
