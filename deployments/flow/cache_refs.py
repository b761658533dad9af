"""The anchor caches' handles an Ingress replica holds, so its Generator calls can offer them."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from ..messages import CacheHandle


class CacheRefs:
    """Handles by subject id, newest last, at most `capacity`.

    Holding a handle keeps its chunks in Ray's object store; dropping old ones bounds that memory.
    A subject whose handle was dropped (or lost with its owner) is loaded from the artifact store.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._refs: OrderedDict[str, CacheHandle] = OrderedDict()

    def put(self, subject_id: str, handle: CacheHandle) -> None:
        if self.capacity <= 0:
            return
        self._refs[subject_id] = handle
        self._refs.move_to_end(subject_id)
        while len(self._refs) > self.capacity:
            self._refs.popitem(last=False)

    def get(self, subject_id: str) -> Optional[CacheHandle]:
        handle = self._refs.get(subject_id)
        if handle is not None:
            self._refs.move_to_end(subject_id)
        return handle

    def drop(self, subject_id: str) -> None:
        self._refs.pop(subject_id, None)
