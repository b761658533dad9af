"""Numbered places in the store: at most `limit` holders under a prefix, however many Ingress
replicas claim at once.

A quota counted by listing what exists lets concurrent requests pass the count together (eight
parallel creates of a key allowed three once made seven subjects). Here each holder takes one of
`<prefix><n>` for n < limit with the store's create-if-absent, which exactly one caller wins:
two requests never hold the same place, so there are never more holders than places. The list
read first only picks places likely to be free (in random order, so racing callers spread out
instead of all trying place 0) and refuses at once when a lowered limit is already full.

Each place holds its holder's id, so releasing checks that the place is still that holder's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from ..artifact_store import ArtifactNotFound, ArtifactStore

# Fixed width: keys are deleted by prefix, and "…/1" is a prefix of "…/10".
_WIDTH = 8


@dataclass(frozen=True)
class HeldSlot:
    key: str
    holder: str
    modified_at: float


def slot_key(prefix: str, number: int) -> str:
    return f"{prefix}{number:0{_WIDTH}d}"


def held_slots(store: ArtifactStore, prefix: str, taken_before: Optional[float] = None) -> list[HeldSlot]:
    """Every place held under `prefix` (one owner's or all of them), or only those taken before
    `taken_before` (unix time): a holder is read only for the places listed."""
    held = []
    for artifact in store.list_prefix(prefix):
        name = artifact.key.rsplit("/", 1)[-1]
        if taken_before is not None and artifact.modified_at >= taken_before:
            continue
        if len(name) == _WIDTH and name.isdigit():
            try:
                holder = store.get(artifact.key).decode()
            except ArtifactNotFound:
                continue  # released meanwhile
            held.append(HeldSlot(artifact.key, holder, artifact.modified_at))
    return held


def claim_slot(store: ArtifactStore, prefix: str, limit: int, holder: str) -> Optional[int]:
    """The place `holder` now holds, or None when all `limit` are held."""
    taken = {a.key for a in store.list_prefix(prefix)}
    if len(taken) >= limit:
        return None
    free = [n for n in range(limit) if slot_key(prefix, n) not in taken]
    random.shuffle(free)
    for number in free:
        if store.create_exclusive(slot_key(prefix, number), holder.encode(), "text/plain"):
            return number
    return None


def release_slot(store: ArtifactStore, prefix: str, number: int, holder: str) -> None:
    """Frees the place if `holder` still holds it (a place freed twice must not free another's)."""
    key = slot_key(prefix, number)
    try:
        if store.get(key).decode() == holder:
            store.delete_prefix(key)
    except ArtifactNotFound:
        pass
