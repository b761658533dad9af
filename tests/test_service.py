"""The service end to end: a real local Ray Serve app over real HTTP, local artifact store.
Stories, subjects and bad input (lost caches and overload: test_service_recovery.py).

One app (tiny preset, 64 px, 3 steps, 2 Generator replicas) serves every test of the module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from service_helpers import (
    ANCHORS, CONFIG, SUBJECTS, assert_same_pixels, create_subject, image_pixels, local_service, ok_json, post,
    tiny_service_args
)
from service_helpers import library, store_root  # noqa: F401 (fixtures)

from consistory import ConsiStoryConfig

NEW = ["a cat in the snow", "a watercolor painting of a cat", "a cat reading a book"]


@pytest.fixture(scope="module")
def service(store_root: Path):
    """Base URL of the running app; Serve and Ray are always shut down afterwards."""
    with local_service(tiny_service_args({"kind": "local", "root": str(store_root)})) as base_url:
        yield base_url


# --- probes ---
def test_health_ready_and_docs(client, service):
    assert ok_json(client.get(f"{service}/healthz", timeout=10)) == {"status": "ok"}
    ready = ok_json(client.get(f"{service}/readyz", timeout=30))
    assert ready["model"] == "preset:tiny:0"
    assert set(ready["replicas"]) == {"anchor_stage", "generator"}
    assert client.get(f"{service}/docs", timeout=10).status_code == 200
    paths = ok_json(client.get(f"{service}/openapi.json", timeout=10))["paths"]
    for path in ("/v1/stories", "/v1/subjects", "/v1/subjects/{subject_id}", "/v1/subjects/{subject_id}/images"):
        assert path in paths


# --- stories ---
def test_story_in_prompt_order_equals_library(client, service, library):
    prompts = ANCHORS + NEW
    answer = ok_json(post(client, f"{service}/v1/stories", {"prompts": prompts, "subjects": SUBJECTS, "seed": 11}))
    assert len(answer["subject_id"]) == 32
    assert [im["index"] for im in answer["images"]] == list(range(len(prompts)))
    assert [im["prompt"] for im in answer["images"]] == prompts
    assert [im["seed"] for im in answer["images"]] == [11 + i for i in range(len(prompts))]
    assert {"anchors_s", "images_s", "total_s", "first_image_s"} <= set(answer["timings"])

    expected = library.generate_story(prompts, SUBJECTS, seed=11, config=CONFIG).images
    for image, reference in zip(answer["images"], expected):
        assert_same_pixels(image_pixels(client, image), reference)


def test_story_b64_json_gives_the_same_images(client, service):
    body = {"prompts": ANCHORS + NEW[:1], "subjects": SUBJECTS, "seed": 12}
    by_url = ok_json(post(client, f"{service}/v1/stories", body))
    by_b64 = ok_json(post(client, f"{service}/v1/stories", {**body, "response_format": "b64_json"}))
    assert by_b64["subject_id"] != by_url["subject_id"]
    for a, b in zip(by_url["images"], by_b64["images"]):
        assert "url" in a and "b64_json" not in a
        assert "b64_json" in b and "url" not in b
        assert (image_pixels(client, a) == image_pixels(client, b)).all()


# --- subjects ---
def test_subject_create_get_extend_delete(client, service, library, store_root):
    created = create_subject(client, service, seed=20)
    subject_id = created["subject_id"]
    assert [im["seed"] for im in created["images"]] == [20, 21]
    anchors = library.create_anchors(ANCHORS, SUBJECTS, seed=20, config=CONFIG)
    for image, reference in zip(created["images"], anchors.images):
        assert_same_pixels(image_pixels(client, image), reference)

    record = ok_json(client.get(f"{service}/v1/subjects/{subject_id}", timeout=10))
    assert record["subjects"] == SUBJECTS and record["prompts"] == ANCHORS and record["seeds"] == [20, 21]
    assert record["model"] == "preset:tiny:0"
    assert ConsiStoryConfig.from_dict(record["config"]) == CONFIG
    assert (store_root / record["cache_key"]).stat().st_size == record["cache_nbytes"]

    # Default seeds continue the anchors' (20, 21 -> 22, 23), as the library's do.
    extended = ok_json(post(client, f"{service}/v1/subjects/{subject_id}/images", {"prompts": NEW[:2]}))
    assert extended["subject_id"] == subject_id
    assert [(im["index"], im["prompt"], im["seed"]) for im in extended["images"]] == [(0, NEW[0], 22), (1, NEW[1], 23)]
    expected = library.generate_from_anchors(anchors.cache, NEW[:2]).images
    for image, reference in zip(extended["images"], expected):
        assert_same_pixels(image_pixels(client, image), reference)

    chosen = ok_json(post(client, f"{service}/v1/subjects/{subject_id}/images",
                          {"prompts": [NEW[2]], "seeds": [99], "response_format": "b64_json"}))
    assert chosen["images"][0]["seed"] == 99
    reference = library.generate_from_anchors(anchors.cache, [NEW[2]], seeds=[99]).images[0]
    assert_same_pixels(image_pixels(client, chosen["images"][0]), reference)

    deleted = client.delete(f"{service}/v1/subjects/{subject_id}", timeout=30)
    assert ok_json(deleted) == {"subject_id": subject_id, "deleted": True}
    assert not (store_root / "subjects" / subject_id).exists()
    assert client.get(f"{service}/v1/subjects/{subject_id}", timeout=10).status_code == 404
    gone = post(client, f"{service}/v1/subjects/{subject_id}/images", {"prompts": [NEW[0]]})
    assert gone.status_code == 404 and subject_id in gone.json()["detail"]
    assert client.delete(f"{service}/v1/subjects/{subject_id}", timeout=30).status_code == 404


# --- bad input ---
STORY = "/v1/stories"
GOOD = {"prompts": ANCHORS, "subjects": SUBJECTS}
UNKNOWN = "0" * 32
BAD_REQUESTS = [
    # (path, JSON body or raw bytes, status, words the detail must contain)
    (STORY, b"{not json", 422, "not valid JSON"),
    (STORY, b"[1, 2]", 422, "JSON object"),
    (STORY, {**GOOD, "prompts": []}, 422, "prompts"),
    (STORY, {**GOOD, "prompts": ["a cat", "   "]}, 422, "prompts[1] is empty"),
    (STORY, {**GOOD, "subjects": []}, 422, "subjects"),
    (STORY, {**GOOD, "prompts": ["a cat", "a dog on a sofa"]}, 422,
     "prompts[1] ('a dog on a sofa') contains none of the subjects"),
    (STORY, {**GOOD, "prompts": ["a cat"] * 7}, 422, "too many prompts: 7 given, at most 6"),
    (STORY, {**GOOD, "height": 100}, 422, "multiple of 8"),
    (STORY, {**GOOD, "width": 4096}, 422, "between 32 and 128"),
    (STORY, {**GOOD, "steps": -1}, 422, "steps"),
    (STORY, {**GOOD, "steps": 500}, 422, "steps must be at most 10"),
    (STORY, {**GOOD, "n_anchors": 0}, 422, "n_anchors"),
    (STORY, {**GOOD, "seed": -3}, 422, "seed"),
    (STORY, {**GOOD, "mask_dropout": 2}, 422, "mask_dropout"),
    (STORY, {**GOOD, "response_format": "png"}, 422, "response_format"),
    (STORY, {**GOOD, "prompt": "a cat"}, 422, "prompt: Extra inputs are not permitted"),
    # The subject word is present but past CLIP's 77 tokens: the library itself refuses it.
    (STORY, {**GOOD, "prompts": ["a photo of a cat", "a " * 90 + "cat"]}, 422, "none of the subjects"),
    ("/v1/subjects", {**GOOD, "prompts": ["a cat"] * 5}, 422, "too many anchors"),
    # This service has no ControlNet: controls are refused before any image is decoded.
    (STORY, {**GOOD, "controls": [None] * len(GOOD["prompts"])}, 422, "no ControlNet configured"),
    ("/v1/subjects", {**GOOD, "controlnet_conditioning_scale": 0.5}, 422, "no ControlNet configured"),
    (f"/v1/subjects/{UNKNOWN}/images", {"prompts": ["a cat"]}, 404, "no subject with id"),
    ("/v1/subjects/not-an-id/images", {"prompts": ["a cat"]}, 404, "no subject with id"),
]


@pytest.mark.parametrize("path, body, status, words", BAD_REQUESTS)
def test_bad_request_gets_an_actionable_4xx(client, service, path, body, status, words):
    if isinstance(body, bytes):
        response = client.post(service + path, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    else:
        response = post(client, service + path, body)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_bad_requests_on_an_existing_subject(client, service):
    subject_id = create_subject(client, service, seed=30)["subject_id"]
    url = f"{service}/v1/subjects/{subject_id}/images"
    wrong_count = post(client, url, {"prompts": NEW[:2], "seeds": [1]})
    assert wrong_count.status_code == 422 and "got 1 seeds for 2 prompts" in wrong_count.json()["detail"]
    no_subject = post(client, url, {"prompts": ["a dog"]})
    assert no_subject.status_code == 422 and "none of the subjects ['cat']" in no_subject.json()["detail"]
    text = client.post(url, data="a cat", headers={"Content-Type": "text/plain"}, timeout=30)
    assert text.status_code == 422 and "Content-Type: application/json" in text.json()["detail"]


def test_unknown_subject_and_artifact_are_404(client, service):
    for method, path in [("get", f"/v1/subjects/{UNKNOWN}"), ("delete", f"/v1/subjects/{UNKNOWN}"),
                         ("get", "/v1/artifacts/subjects/nothing/here.png"),
                         ("get", "/v1/artifacts/%2e%2e/%2e%2e/etc/passwd")]:
        response = client.request(method, service + path, timeout=30)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["detail"]
