"""The anchor caches one Generator replica holds, by subject id: routed to by Serve's model
multiplexing, bounded in bytes by an LRU of their own.

Two mechanisms, each doing the part it is made for:

- Serve's model multiplexing, through its public API only (`serve.multiplexed`, with the
  subject id as the model id of each request): Serve routes a subject's requests to replicas
  that registered it. What it keeps per subject here is a `Registration` of a few bytes, so its
  count bound (`max_subjects`, far above what fits in memory) never decides what is evicted.
- A byte-bounded LRU here holds the caches themselves: once they pass `budget_bytes`, the least
  recently used go first (the one being used always stays, however large).

Serve offers no public way to forget one model id, so a subject whose cache the LRU evicted
stays registered here: its requests may still come to this replica, which loads the cache again
(from the object store, else the artifact store) as any replica would. Serve's behaviour this
relies on is pinned by tests/test_service_multiplexing.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable, Generic, Protocol, TypeVar

from ray import serve


class Sized(Protocol):
    nbytes: int


T = TypeVar("T", bound=Sized)
DEFAULT_MAX_SUBJECTS = 1024  # Serve's count bound: never reached before the byte budget


@dataclass(frozen=True)
class Registration:
    """What Serve's multiplexing holds for a subject on this replica: only its id."""

    subject_id: str


class ReplicaCaches(Generic[T]):
    def __init__(self, budget_bytes: int, max_subjects: int = DEFAULT_MAX_SUBJECTS) -> None:
        self.budget_bytes = budget_bytes
        self._held: OrderedDict[str, T] = OrderedDict()  # least recently used first
        self._loading: dict[str, asyncio.Future] = {}
        self.registrations: Counter[str] = Counter()  # Serve's loader calls, by subject

        async def register(subject_id: str) -> Registration:
            self.registrations[subject_id] += 1
            return Registration(subject_id)

        # A plain function, not a bound method: Serve keeps its per-replica state on the
        # decorated loader, and a bound method takes no attributes.
        self._register = serve.multiplexed(max_num_models_per_replica=max_subjects)(register)

    @staticmethod
    def routed_subject() -> str:
        """The subject id this request was routed by (`multiplexed_model_id`), or ""."""
        return serve.get_multiplexed_model_id()

    async def get(self, subject_id: str, load: Callable[[], Awaitable[T]]) -> T:
        """The subject's cache: held here, or loaded by `load()` once however many requests
        for it arrive meanwhile. Registers the subject with Serve's routing first, so that its
        next requests come here while it loads."""
        await self._register(subject_id)
        cache = self._held.get(subject_id)
        if cache is None:
            cache = await self._load_once(subject_id, load)
        self._held[subject_id] = cache
        self._held.move_to_end(subject_id)
        self._evict_over_budget(keep=subject_id)
        return cache

    async def _load_once(self, subject_id: str, load: Callable[[], Awaitable[T]]) -> T:
        loading = self._loading.get(subject_id)
        if loading is None:
            loading = self._loading[subject_id] = asyncio.ensure_future(self._load_and_hold(subject_id, load))
        # Shielded: one caller that goes away does not stop a load others wait for.
        return await asyncio.shield(loading)

    async def _load_and_hold(self, subject_id: str, load: Callable[[], Awaitable[T]]) -> T:
        try:
            cache = await load()
            # Held before the load counts as finished: a request arriving in between finds it.
            self._held[subject_id] = cache
            return cache
        finally:
            self._loading.pop(subject_id, None)

    def _evict_over_budget(self, keep: str) -> None:
        for oldest in list(self._held):
            if self.nbytes <= self.budget_bytes:
                return
            if oldest != keep:
                del self._held[oldest]

    @property
    def subjects(self) -> list[str]:
        """The subjects held, least recently used first."""
        return list(self._held)

    @property
    def nbytes(self) -> int:
        return sum(cache.nbytes for cache in self._held.values())
