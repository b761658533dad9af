"""What the Generator's cache LRU (deployments/replicas/replica_caches.py) relies on Serve's model
multiplexing for, pinned on a tiny Serve app on loopback: requests with the same multiplexed
model id reach the replica that registered it, Serve's loader runs once per id per replica, and
what the LRU evicts by bytes stays routed there and is loaded again. If a Ray upgrade changes
any of this, this fails before the service's cache locality quietly does."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from service_helpers import free_port

from deployments.local import init_ray
from deployments.replicas.replica_caches import ReplicaCaches

BLOB_BYTES = 10
BUDGET_BYTES = 25  # two blobs fit, three do not
ROUTING_SETTLES_S = 3.0  # replicas push their model ids every 0.1 s; routers hear of them by long poll


@dataclass
class Blob:
    """Stands in for an anchor cache: only its size matters to the LRU."""

    subject_id: str
    nbytes: int = BLOB_BYTES


def holder_deployment():
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16)
    class Holder:
        def __init__(self) -> None:
            self.caches: ReplicaCaches[Blob] = ReplicaCaches(BUDGET_BYTES)
            self.loads: Counter[str] = Counter()
            self.replica = serve.get_replica_context().replica_id.unique_id

        async def get(self, subject_id: str) -> dict:
            async def load() -> Blob:
                self.loads[subject_id] += 1
                await asyncio.sleep(0.2)  # long enough for concurrent requests to find it loading
                return Blob(subject_id)

            blob = await self.caches.get(subject_id, load)
            return {"replica": self.replica, "routed": self.caches.routed_subject(), "blob": blob.subject_id}

        async def stats(self) -> dict:
            return {"replica": self.replica, "registrations": dict(self.caches.registrations),
                    "loads": dict(self.loads), "held": self.caches.subjects, "nbytes": self.caches.nbytes}

    return Holder


@pytest.fixture(scope="module")
def apps():
    import sys

    import ray
    from ray import cloudpickle, serve

    # The replicas cannot import this test module: its deployment travels by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        holder = holder_deployment()
        spread = serve.run(holder.options(num_replicas=2).bind(), name="spread", route_prefix="/spread")
        single = serve.run(holder.options(num_replicas=1).bind(), name="single", route_prefix="/single")
        yield spread, single
    finally:
        serve.shutdown()
        ray.shutdown()


def _get(handle, subject_id: str) -> dict:
    return handle.options(multiplexed_model_id=subject_id).get.remote(subject_id).result(timeout_s=60)


def _stats(handle, replicas: int) -> dict[str, dict]:
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 60
    while len(seen) < replicas and time.monotonic() < deadline:
        stats = handle.stats.remote().result(timeout_s=60)
        seen[stats["replica"]] = stats
    assert len(seen) == replicas, f"only {len(seen)} of {replicas} replicas answered"
    return seen


def test_a_subjects_requests_reach_the_replica_that_registered_it(apps) -> None:
    spread, _ = apps
    first = _get(spread, "a")
    assert first["routed"] == "a" and first["blob"] == "a"
    time.sleep(ROUTING_SETTLES_S)
    replicas = {_get(spread, "a")["replica"] for _ in range(12)}
    assert replicas == {first["replica"]}, "requests for a subject left the replica holding it"
    stats = _stats(spread, 2)
    assert stats[first["replica"]]["registrations"]["a"] == 1 and stats[first["replica"]]["loads"]["a"] == 1
    others = [s for r, s in stats.items() if r != first["replica"]]
    assert all("a" not in s["registrations"] for s in others)


def test_serves_loader_and_the_load_run_once_per_id_per_replica(apps) -> None:
    spread, _ = apps
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _get(spread, "b"), range(8)))
    assert {a["blob"] for a in answers} == {"b"}
    for stats in _stats(spread, 2).values():
        assert stats["registrations"].get("b", 0) <= 1 and stats["loads"].get("b", 0) <= 1, stats


def test_the_lru_evicts_by_bytes_and_an_evicted_subject_loads_again_where_it_is_routed(apps) -> None:
    _, single = apps
    for subject_id in ("x", "y", "z"):
        _get(single, subject_id)
    (stats,) = _stats(single, 1).values()
    assert stats["held"] == ["y", "z"] and stats["nbytes"] == 2 * BLOB_BYTES <= BUDGET_BYTES
    assert _get(single, "x")["blob"] == "x"
    (stats,) = _stats(single, 1).values()
    assert stats["held"] == ["z", "x"]
    # Serve still holds x's registration (no reload of it); the LRU loaded its bytes again.
    assert stats["registrations"]["x"] == 1 and stats["loads"]["x"] == 2
