"""Uploaded images kept in the store: a subject's photo anchors and anchor controls (what a
rebuild of its cache needs besides the record), and a job's photos and controls (what its
runner needs, decoded once when the job was accepted). Each is a PNG at
`<prefix>inputs/<kind>-<i>.png`, recorded with its sha256 so that a changed file is noticed.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

from pydantic import BaseModel, ConfigDict

from ..artifact_store import ArtifactNotFound, ArtifactStore


class StoredImage(BaseModel):
    """An uploaded image the subject was made with, stored under the subject's prefix."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    key: str
    sha256: str


class MissingInput(Exception):
    """A stored photo or control is gone or does not match its record."""


def input_key(prefix: str, kind: str, index: int) -> str:
    return f"{prefix}inputs/{kind}-{index:03d}.png"


def store_inputs(store: ArtifactStore, prefix: str, kind: str,
                 pngs: Optional[Sequence[Optional[bytes]]]) -> Optional[list[Optional[StoredImage]]]:
    """Store uploaded images ("photo" or "control") under `prefix`, each with its sha256."""
    if pngs is None:
        return None
    stored: list[Optional[StoredImage]] = []
    for i, png in enumerate(pngs):
        if png is None:
            stored.append(None)
            continue
        key = input_key(prefix, kind, i)
        store.put(key, png, "image/png")
        stored.append(StoredImage(key=key, sha256=hashlib.sha256(png).hexdigest()))
    return stored


def load_inputs(store: ArtifactStore,
                stored: Optional[Sequence[Optional[StoredImage]]]) -> Optional[tuple[Optional[bytes], ...]]:
    if stored is None:
        return None
    pngs: list[Optional[bytes]] = []
    for item in stored:
        if item is None:
            pngs.append(None)
            continue
        try:
            png = store.get(item.key)
        except ArtifactNotFound:
            raise MissingInput(f"{item.key} is missing") from None
        if hashlib.sha256(png).hexdigest() != item.sha256:
            raise MissingInput(f"{item.key} does not match the sha256 in its record")
        pngs.append(png)
    return tuple(pngs)
