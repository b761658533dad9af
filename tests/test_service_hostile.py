"""The service against hostile and careless clients and a failing store: a real local Ray Serve
app over real HTTP (tiny preset, two Generators), talked to as an attacker would (damaged caches:
test_service_damaged_caches.py).

Every answer must be one the OpenAPI schema documents; nothing may hang, leak a path, or leave
half a subject behind.
"""

from __future__ import annotations

import collections
import concurrent.futures
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import requests
from service_helpers import (
    ANCHORS, REQUEST_TIMEOUT_S, SIZE, SUBJECTS, http, image_pixels, local_service, ok_json, post,
    tiny_service_args
)
from service_helpers import store_root  # noqa: F401 (fixtures)

from deployments.flow.signed_urls import signature, signed_url

PROMPT = "a cat in the snow"
DEADLINE_S = 8.0


@pytest.fixture(scope="module")
def service(store_root: Path):
    args = tiny_service_args(
        {"kind": "local", "root": str(store_root)},
        request_deadline_s=DEADLINE_S,
        ready_cache_s=0.5,
        # Room for a request that outlasts the deadline: 256 px, 50 steps.
        # A fixed body limit (unset, it grows with the image limits): the oversized-body test
        # sends text bodies a few hundred KB large.
        limits={"max_prompts": 6, "max_height": 256, "max_width": 256, "max_steps": 50, "max_body_bytes": "64KiB"},
    )
    with local_service(args) as base_url:
        yield base_url


def _create(client, service, seed: int) -> str:
    # Anchors of stories stopped by the tests above still finish on the AnchorStage (they are
    # shielded, so nothing is left half-persisted): until they have, a new subject can pass the
    # 8 s deadline and get 503 + Retry-After. Retry as a client would.
    for _ in range(30):
        response = post(client, f"{service}/v1/subjects", {"prompts": ANCHORS, "subjects": SUBJECTS, "seed": seed})
        if response.status_code != 503:
            break
        time.sleep(int(response.headers["retry-after"]))
    return ok_json(response)["subject_id"]


# --- bodies ---
def test_oversized_bodies_get_413_before_parsing_and_the_service_stays_responsive(client, service):
    # 4 subjects x 5,000 words, 16 prompts: once 27 s of regex on the event loop.
    words = " ".join(f"cat{i}" for i in range(5000))
    body = {"prompts": [f"a {words} cat"] * 16, "subjects": [words] * 4}
    flood = threading.Thread(target=lambda: [post(http(), f"{service}/v1/stories", body) for _ in range(5)])
    flood.start()
    started = time.monotonic()
    response = post(client, f"{service}/v1/stories", body)
    assert response.status_code == 413 and "larger than" in response.json()["detail"]
    assert client.get(f"{service}/healthz", timeout=5).status_code == 200
    assert time.monotonic() - started < 5
    flood.join(timeout=60)
    # Just under the limit, the most work a body can ask of the checks: still answered at once.
    near = {"prompts": [("a " + " ".join(f"w{i}" for i in range(300)))[:990] for _ in range(16)],
            "subjects": ["w1 w2 w3 w4 w5 w6 w7 w8"] * 4}
    started = time.monotonic()
    assert post(client, f"{service}/v1/stories", near).status_code == 422
    assert time.monotonic() - started < 5
    huge = client.post(f"{service}/v1/stories", data=b"[" + b"1," * 10_000_000 + b"1]",
                       headers={"Content-Type": "application/json"}, timeout=60)
    assert huge.status_code == 413


@pytest.mark.parametrize("body, words", [
    (b"[" * 5000 + b"]" * 5000, "nests deeper"),
    ('{"prompts": ["a caf\xe9 cat"], "subjects": ["cat"]}'.encode("latin-1"), "not UTF-8"),
    (b'{"prompts": ["a cat \\ud800"], "subjects": ["cat"]}', "valid string"),
    (b'{"prompts": ["a cat\\u0000"], "subjects": ["cat"]}', "control character"),
    (b'{"prompts": ["a cat", "a cat"], "subjects": ["cat"], "guidance_scale": Infinity}', "guidance_scale"),
    (b'{"prompts": ["a cat", "a cat"], "subjects": ["cat"], "guidance_scale": NaN}', "guidance_scale"),
    (b'{"prompts": ["a cat", "a cat"], "subjects": ["cat"], "guidance_scale": 1e308}', "guidance_scale"),
    (b'{"prompts": ["a cat", "a cat"], "subjects": ["cat"], "n_anchors": 3}', "n_anchors is 3"),
    (b'{"prompts": ["a cat", "a cat"], "subjects": ["cat"], "seed": 9223372036854775807}', "seed"),
    (b'{"prompts": ["a cat"], "subjects": ["' + b"x " * 20 + b'cat"]}', "too long"),
])
def test_hostile_bodies_get_a_documented_422(client, service, body, words):
    response = client.post(f"{service}/v1/stories", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and words in detail
    assert response.headers["x-request-id"]


def test_unicode_prompts_work(client, service):
    story = {"prompts": ["a cat 🐈 in Kyōto, 雪の中の猫", "a cat (قطة) — «on the beach»"], "subjects": ["cat"], "seed": 1}
    answer = ok_json(post(client, f"{service}/v1/stories", story))
    assert [i["prompt"] for i in answer["images"]] == story["prompts"]
    for image in answer["images"]:
        assert image_pixels(client, image).shape == (SIZE, SIZE, 3)


# --- paths ---
@pytest.mark.parametrize("path", [
    "/v1/subjects/..%2f..%2fetc%2fpasswd", "/v1/subjects/%2e%2e", "/v1/subjects/" + "0" * 32 + "%0a",
    "/v1/subjects/" + "a" * 5000, "/v1/subjects/%00", "/v1/artifacts/subjects/..%2f..%2frecord.json",
    "/v1/artifacts/subjects/" + "0" * 32 + "/record.json", "/v1/artifacts/%2e%2e/%2e%2e/etc/passwd",
    "/v1/artifacts/subjects/" + "0" * 32 + "/anchor_cache.safetensors",
])
def test_path_tricks_are_404(client, service, store_root, path):
    response = client.get(service + path, timeout=30)
    assert response.status_code == 404, (path, response.text)
    assert str(store_root) not in response.text


def test_image_urls_are_signed_expiring_and_one_404_wording(client, service, store_root):
    subject_id = _create(client, service, seed=3)
    answer = ok_json(post(client, f"{service}/v1/subjects/{subject_id}/images", {"prompts": [PROMPT]}))
    url = answer["images"][0]["url"]
    assert url.startswith(service + "/v1/artifacts/") and "signature=" in url and "expires=" in url
    assert client.get(url, timeout=30).status_code == 200
    assert client.get(url.replace("signature=", "signature=0"), timeout=30).status_code == 403
    unsigned = url.split("?")[0]
    assert client.get(unsigned, timeout=30).status_code == 403
    other = client.post(f"{service}/v1/stories", json={"prompts": ANCHORS, "subjects": SUBJECTS, "seed": 1},
                        headers={"Host": "evil.example"}, timeout=REQUEST_TIMEOUT_S)
    assert ok_json(other)["images"][0]["url"].startswith(service)  # the configured base, not the Host header
    # Every replica signs with the key the first one stored; the operator can sign with it too.
    secret = (store_root / "service" / "url-signing-key").read_bytes()
    query = parse_qs(urlsplit(url).query)
    key = unquote(urlsplit(url).path).split("/v1/artifacts/")[1]
    assert signature(secret, key, int(query["expires"][0])) == query["signature"][0]
    never_made = f"subjects/{'0' * 32}/images/0000000000000-00000000/000.png"
    unknown = client.get(signed_url(secret, service, "/v1/artifacts", never_made, 60), timeout=30)
    client.delete(f"{service}/v1/subjects/{subject_id}", timeout=30)
    deleted = client.get(url, timeout=30)
    assert unknown.status_code == deleted.status_code == 404
    assert unknown.json()["detail"] == deleted.json()["detail"]


# --- load ---
def test_hundreds_of_concurrent_connections_are_all_answered(service):
    def one(i: int) -> tuple[str, int, str]:
        with http() as session:
            if i % 20 == 0:
                kind, response = "story", post(session, f"{service}/v1/stories", {"prompts": ANCHORS, "subjects": SUBJECTS})
            elif i % 2:
                kind, response = "healthz", session.get(f"{service}/healthz", timeout=REQUEST_TIMEOUT_S)
            else:
                kind, response = "subject", session.get(f"{service}/v1/subjects/{'0' * 32}", timeout=REQUEST_TIMEOUT_S)
            return kind, response.status_code, response.headers.get("retry-after", "")

    with concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool:
        answers = list(pool.map(one, range(300)))
    counts = collections.Counter((kind, status) for kind, status, _ in answers)
    # Every connection gets an answer; under overload that answer may be "busy, retry".
    expected = {"story": {200, 503}, "healthz": {200, 503}, "subject": {404, 503}}
    assert all(status in expected[kind] for kind, status, _ in answers), counts
    assert all(retry for _, status, retry in answers if status == 503), counts
    assert counts[("story", 200)] >= 1 and counts[("subject", 404)] >= 1, counts


def test_a_request_past_the_deadline_is_stopped_whatever_its_headers_say(client, service, store_root):
    before = set((store_root / "subjects").iterdir()) if (store_root / "subjects").exists() else set()
    story = {"prompts": [f"a cat number {i}" for i in range(6)], "subjects": SUBJECTS, "steps": 50,
             "height": 256, "width": 256}
    started = time.monotonic()
    response = client.post(f"{service}/v1/stories", json=story, timeout=REQUEST_TIMEOUT_S,
                           headers={"x-request-timeout-seconds": "0", "x-request-disconnect-disabled": "?1"})
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    assert time.monotonic() - started < DEADLINE_S + 15
    time.sleep(2)
    after = set((store_root / "subjects").iterdir())
    assert not (after - before), "the stopped story left its subject behind"


def test_a_client_that_leaves_mid_story_cancels_its_fan_out(service, store_root):
    before = set((store_root / "subjects").iterdir())
    story = {"prompts": [f"a cat number {i}" for i in range(6)], "subjects": SUBJECTS, "steps": 50,
             "height": 256, "width": 256}
    with pytest.raises(requests.exceptions.ReadTimeout):
        http().post(f"{service}/v1/stories", json=story, timeout=2.0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and set((store_root / "subjects").iterdir()) - before:
        time.sleep(0.5)
    assert not (set((store_root / "subjects").iterdir()) - before), "the abandoned story left a subject"


# --- a failing store (last: it breaks the store for a moment) ---
def test_a_store_that_refuses_writes_gives_503_without_paths_or_leftovers(client, service, store_root):
    subjects = store_root / "subjects"
    moved = store_root / "subjects-away"
    subjects.mkdir(parents=True, exist_ok=True)  # whether or not an earlier test stored a subject
    shutil.move(subjects, moved)
    subjects.write_text("not a directory: every write under subjects/ fails")
    try:
        for _ in range(30):  # until the anchors of the stories stopped above are done (see _create)
            response = post(client, f"{service}/v1/subjects", {"prompts": ANCHORS, "subjects": SUBJECTS, "seed": 5})
            if response.status_code != 503 or "took longer than" not in response.json()["detail"]:
                break
            time.sleep(int(response.headers["retry-after"]))
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        detail = response.json()["detail"]
        assert "artifact store" in detail and response.headers["x-request-id"] in detail
        assert str(store_root) not in response.text and "subjects" not in detail
    finally:
        subjects.unlink()
        shutil.move(moved, subjects)


def test_readiness_reflects_the_deployments_and_hides_the_store(client, service):
    # Ready again once the load of the tests above has passed: on a machine shared with other
    # heavy work a replica can be restarting, or the controller's answer take past the 8 s
    # deadline (503 + Retry-After), for a while.
    deadline = time.monotonic() + 300
    while (response := client.get(f"{service}/readyz", timeout=REQUEST_TIMEOUT_S)).status_code == 503:
        assert time.monotonic() < deadline, response.text
        time.sleep(int(response.headers["retry-after"]))
    ready = ok_json(response)
    assert ready["replicas"]["generator"]["running"] >= 1 and "store" not in ready


# --- fuzzing from the service's own OpenAPI schema ---
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_get_only_answers_the_schema_documents(service, mode):
    """Schemathesis draws requests from /openapi.json (valid ones, then ones that break it) and
    checks every answer: never a 5xx other than a documented 503 with Retry-After (a valid story
    can pass the 8 s deadline on a loaded machine), a documented status and content type, a body
    that matches its schema."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    # Every 422 is the service's own one-sentence body, never FastAPI's default list.
    assert "HTTPValidationError" not in http().get(f"{service}/openapi.json", timeout=30).text
    schema = schemathesis.openapi.from_url(f"{service}/openapi.json")
    checks = [getattr(schemathesis.checks, name) for name in (
        "status_code_conformance", "content_type_conformance", "response_schema_conformance")]
    session = http()

    @settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(generation_mode=GenerationMode(mode)))
    def answered_as_documented(case) -> None:
        response = case.call_and_validate(base_url=service, session=session, checks=checks, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code < 500 or response.status_code == 503, response.text
        assert response.status_code != 503 or response.headers.get("retry-after"), response.text

    answered_as_documented()
