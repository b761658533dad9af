"""The service when things go wrong around it, on a real local Ray Serve app over HTTP: a cache
outlives the replica that made it and its stored copy, travels through the object store, and an
overloaded service answers 503 with Retry-After instead of hanging.

One app (tiny preset, 64 px, 3 steps, 2 Generator replicas) serves the module; the overload test
adds a second, deliberately small app next to it.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import pytest
from service_helpers import (
    ANCHORS, APP, CONFIG, REQUEST_TIMEOUT_S, SUBJECTS, assert_same_pixels, create_subject, http, image_pixels,
    local_service, ok_json, post, replace_replicas, tiny_service_args
)
from service_helpers import library, store_root  # noqa: F401 (fixtures)

NEW = ["a cat in the snow", "a watercolor painting of a cat", "a cat reading a book"]


@pytest.fixture(scope="module")
def service(store_root: Path):
    with local_service(tiny_service_args({"kind": "local", "root": str(store_root)})) as base_url:
        yield base_url


# --- no lost subjects ---
def test_cache_survives_its_owner_and_its_artifact(client, service, library, store_root):
    """A cache object dies with the AnchorStage replica that put it; new images of the subject
    still come out the same, first from the stored cache, then (cache deleted too) from a
    rebuild out of the subject record."""
    prompt = NEW[0]
    reference = {}
    for seed in (40, 50):
        cache = library.create_anchors(ANCHORS, SUBJECTS, seed=seed, config=CONFIG).cache
        reference[seed] = library.generate_from_anchors(cache, [prompt]).images[0]

    # 1. The owner dies (and Serve replaces it); the stored cache is loaded instead.
    subject_id = create_subject(client, service, seed=40)["subject_id"]
    replace_replicas(APP, "AnchorStage", service, expected=1)
    answer = ok_json(post(client, f"{service}/v1/subjects/{subject_id}/images", {"prompts": [prompt]}))
    assert_same_pixels(image_pixels(client, answer["images"][0]), reference[40])

    # 2. The owner dies and the stored cache is gone too; the record rebuilds it.
    subject_id = create_subject(client, service, seed=50)["subject_id"]
    cache_file = store_root / "subjects" / subject_id / "anchor_cache.safetensors"
    cache_file.unlink()
    replace_replicas(APP, "AnchorStage", service, expected=1)
    answer = ok_json(post(client, f"{service}/v1/subjects/{subject_id}/images", {"prompts": [prompt]}))
    assert_same_pixels(image_pixels(client, answer["images"][0]), reference[50])
    assert cache_file.is_file(), "the rebuilt cache is persisted again"


def test_new_images_take_the_cache_through_the_object_store(client, service, library, store_root):
    """The cache goes from the AnchorStage to a Generator as an ObjectRef: with its stored copy
    removed, a new image still comes out right and nothing was rebuilt (a rebuild would store
    the cache again)."""
    subject_id = create_subject(client, service, seed=60)["subject_id"]
    cache_file = store_root / "subjects" / subject_id / "anchor_cache.safetensors"
    assert cache_file.is_file()
    over_http = client.get(f"{service}/v1/artifacts/subjects/{subject_id}/anchor_cache.safetensors", timeout=10)
    assert over_http.status_code == 404, "anchor caches are never served over HTTP"
    cache_file.unlink()
    answer = ok_json(post(client, f"{service}/v1/subjects/{subject_id}/images", {"prompts": NEW[:1]}))
    cache = library.create_anchors(ANCHORS, SUBJECTS, seed=60, config=CONFIG).cache
    assert_same_pixels(image_pixels(client, answer["images"][0]), library.generate_from_anchors(cache, NEW[:1]).images[0])
    assert not cache_file.exists(), "the cache was rebuilt instead of taken from the object store"


# --- overload ---
def test_overload_answers_503_with_retry_after_never_hangs(client, service, store_root):
    """A second app with one slow Generator and tiny queues, flooded: every request is answered
    in bounded time, either 200 or 503 with Retry-After."""
    from ray import serve

    from deployments.local import run_app

    port = int(service.rsplit(":", 1)[1])
    args = tiny_service_args(
        {"kind": "local", "root": str(store_root / "overload")},
        generators=1,
        # The Ingress admits 8 less the probes' 4 (503 past that) and the proxy queues 1 more;
        # their generator calls find room for 1 + 2.
        ingress={"num_cpus": 0.05, "max_ongoing_requests": 8, "max_queued_requests": 1},
        generator={"num_cpus": 0.2, "min_replicas": 1, "max_replicas": 1,
                   "max_ongoing_requests": 1, "max_queued_requests": 2},
    )
    base = run_app(args, name="overload", route_prefix="/overload", port=port)
    try:
        created = post(client, f"{base}/v1/subjects", {"prompts": ANCHORS, "subjects": SUBJECTS, "seed": 1})
        subject_id = ok_json(created)["subject_id"]
        url = f"{base}/v1/subjects/{subject_id}/images"

        def one(_: int) -> tuple[int, dict, str, float]:
            started = time.monotonic()
            with http() as session:
                response = post(session, url, {"prompts": NEW[:1]})
            return response.status_code, dict(response.headers), response.text, time.monotonic() - started

        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(one, range(16)))
    finally:
        serve.delete("overload")

    statuses = [status for status, _, _, _ in results]
    kinds = [h.get("content-type", "?") for status, h, _, _ in results if status == 503]
    print(f"overload: {statuses.count(200)} x 200, 503 by content type: "
          f"{ {k: kinds.count(k) for k in set(kinds)} }")
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses and 200 in statuses, statuses
    for status, headers, text, elapsed in results:
        assert elapsed < REQUEST_TIMEOUT_S
        if status == 503:
            assert int(headers["retry-after"]) >= 1
            # Serve's proxy answers a full Ingress queue in plain text; the Ingress itself
            # answers its own admission bound and a full Generator queue in FastAPI's shape.
            if headers.get("content-type") == "application/json":
                detail = json.loads(text)["detail"]
                assert "at capacity" in detail or "requests at once" in detail, detail
