"""Warm replicas over HTTP: each model replica makes one short generation before it is ready,
so the first user of a fresh replica does not pay for what a process does once (the first
generation; compiling, with `compile`). A real local Serve app on the tiny preset."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
from service_helpers import APP, create_subject, local_service, ok_json, post, tiny_service_args
from service_helpers import store_root  # noqa: F401 (a fixture)

PROMPTS = ["a cat in the snow", "a cat reading a book", "a cat on a skateboard", "a cat in a spaceship"]
# serve_config.yaml's request: 64 px, 10 steps. (At 3 steps a request is ~0.2 s here, and the
# Ingress's first call through its Generator handle, tens of ms, is most of what stays.)
DEFAULTS = {"steps": 10, "height": 64, "width": 64}


@pytest.fixture(scope="module")
def service(store_root: Path):
    # A fresh app: its Generator replica has served nothing before the test's first request.
    args = tiny_service_args({"kind": "local", "root": str(store_root)}, generators=1, defaults=DEFAULTS)
    with local_service(args) as base_url:
        yield base_url


def _seconds(client, base_url: str, subject_id: str, prompt: str, seed: int) -> float:
    started = time.perf_counter()
    ok_json(post(client, f"{base_url}/v1/subjects/{subject_id}/images", {"prompts": [prompt], "seeds": [seed]}))
    return time.perf_counter() - started


def test_the_first_request_on_a_fresh_generator_costs_what_the_next_ones_do(client, service):
    from ray import serve

    stats = serve.get_deployment_handle("Generator", app_name=APP).cache_stats.remote().result(timeout_s=60)
    assert stats["warm_up_s"] and stats["first_image_at"] is None  # warmed, and no image made yet
    subject_ids = [create_subject(client, service, seed=3 + i)["subject_id"] for i in range(len(PROMPTS))]
    first = _seconds(client, service, subject_ids[0], PROMPTS[0], 10)
    # Each next one is the first request of another subject, so it too fetches its subject's
    # cache: only what a fresh process pays once differs. A median: one request on a loaded
    # 2-core machine can be slow by itself.
    following = statistics.median(_seconds(client, service, s, p, 11 + i)
                                  for i, (s, p) in enumerate(zip(subject_ids[1:], PROMPTS[1:])))
    assert first <= 1.2 * following, f"first request {first:.3f} s, the following ones {following:.3f} s"
