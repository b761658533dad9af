"""The service's edge against clients behind a public load balancer, each defect a probe of a
running service found: a real local Ray Serve app over HTTP, API keys on, tiny preset.

Held event streams, bodies sent a byte at a time and oversized headers must not take what the
probes and other clients need; thin strips of photos are refused before any model work; every
number a client writes is read strictly (4xx or ignored, never 500, never coerced), and a URL's
signature too; a body of any shape is checked in linear time, and read only where a route takes
it; OPTIONS says every method of a path; invisible formatting characters never reach a prompt.
"""

from __future__ import annotations

import asyncio
import base64
import io
import statistics
import time
from pathlib import Path

import pytest
from hostile_clients import HeldStream, request, running_job, slow_body
from PIL import Image
from service_helpers import http, local_service, tiny_service_args
from service_helpers import store_root  # noqa: F401 (fixtures)

from deployments.edge.api_keys import hash_token, new_token

KEYS = {name: new_token() for name in [f"k{i}" for i in range(10)] + ["well"]}
INGRESS_SLOTS = 32  # the Ingress's max_ongoing_requests: what a starving client had to fill
STREAMS, STREAMS_PER_KEY = 14, 4  # (32 - 4 kept for probes) // 2, and the default per key
BODY_ALLOWANCE_S = 2.0
def short(value) -> str:
    """A test id for a value thousands of characters long."""
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return text if len(text) <= 20 else f"{text[:4]}...{len(text)}-chars"


SUBJECT = {"prompts": ["a photo of a cat in the park", "a photo of a cat on the beach"], "subjects": ["cat"]}


@pytest.fixture(scope="module")
def service(store_root: Path):
    args = tiny_service_args(
        {"kind": "local", "root": str(store_root)}, generators=1,
        auth={"enabled": True, "keys": [{"name": n, "sha256": hash_token(t)} for n, t in KEYS.items()]},
        ingress={"num_cpus": 0.05, "max_ongoing_requests": INGRESS_SLOTS, "max_queued_requests": 64},
        edge={"body_allowance_s": BODY_ALLOWANCE_S},
    )
    with local_service(args) as base_url:
        yield base_url


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


async def _probe_times(base_url: str, count: int = 20) -> list[float]:
    times = []
    for i in range(count):
        answer = await request(base_url, "GET", "/healthz" if i % 2 else "/readyz", timeout_s=5)
        assert answer.status == 200, answer
        times.append(answer.seconds)
        await asyncio.sleep(0.05)
    return times


def test_held_event_streams_are_bounded_and_leave_the_probes_and_routes_alone(service, store_root):
    """Today's defect: ~32 held streams timed every route out, /healthz included."""
    async def scenario():
        jobs = {f"k{i}": running_job(store_root, f"k{i}") for i in range(10)}

        async def open_for(key: str) -> HeldStream:
            return await HeldStream.open(service, f"/v1/jobs/{jobs[key]}/events", auth(key))

        streams = [await open_for("k0") for _ in range(STREAMS_PER_KEY + 1)]
        try:
            assert [s.answer.status for s in streams] == [200] * STREAMS_PER_KEY + [429]
            assert b"API key 'k0' already holds its 4 event streams" in streams[-1].answer.body
            # The others all at once: past the bound (or, while the replica is full of them for a
            # moment, past what it admits), refused at once with Retry-After.
            streams += await asyncio.gather(*[open_for(f"k{i}") for i in range(1, 10) for _ in range(STREAMS_PER_KEY)])
            for key in jobs:  # topped up one at a time, to the bound
                while (more := await open_for(key)).answer.status == 200:
                    streams.append(more)
                streams.append(more)
            held = [s for s in streams if s.answer.status == 200]
            refused = [s.answer for s in streams if s.answer.status != 200]
            assert len(held) == STREAMS, len(held)
            assert all(a.status in (429, 503) and int(a.headers["retry-after"]) >= 1 for a in refused), refused
            assert b"this Ingress replica already holds its 14 event streams" in refused[-1].body
            firsts = [await s.first_bytes() for s in held]
            assert all(b"id: 0\nevent: status" in first for first in firsts), firsts  # in HTTP chunks
            times = await _probe_times(service)
            assert max(times) < 0.5, times
            other = await request(service, "GET", "/v1/subjects", auth("well"), timeout_s=5)
            assert other.status == 200 and other.seconds < 2, other
        finally:
            for s in streams:
                s.close()

    asyncio.run(scenario())


def test_bodies_sent_slowly_hold_nothing(service):
    """Today's defect: 32 connections trickling a body a byte every few seconds, no key needed,
    stalled the service for as long as they lasted."""
    async def scenario():
        path = "/v1/subjects"
        anonymous = [asyncio.ensure_future(slow_body(service, path, {}, 4000, 1.0, give_up_s=60))
                     for _ in range(INGRESS_SLOTS)]
        keyed = [asyncio.ensure_future(slow_body(service, path, auth("k1"), 4000, 1.0, give_up_s=60))
                 for _ in range(4)]
        await asyncio.sleep(1.0)
        times = await _probe_times(service)
        answers = await asyncio.gather(*anonymous)
        assert all(a.status == 401 and a.seconds < 5 for a in answers), answers
        assert all(a.headers.get("connection") == "close" for a in answers)
        late = await asyncio.gather(*keyed)
        assert all(a.status == 408 and b"too slowly" in a.body for a in late), late
        assert all(BODY_ALLOWANCE_S - 0.5 < a.seconds < BODY_ALLOWANCE_S + 10 for a in late), late
        assert max(times) < 0.5, times

    asyncio.run(scenario())


@pytest.mark.parametrize("size", [64 * 1024, 2 * 2**20])
def test_oversized_headers_get_431(service, size):
    async def scenario():
        big = await request(service, "GET", "/healthz", {"X-Padding": "x" * size}, timeout_s=60)
        assert big.status == 431 and b"headers are" in big.body, big
        assert (await request(service, "GET", "/healthz")).status == 200

    asyncio.run(scenario())


def _png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("width, height", [(1, 16384), (1, 2048 * 2048), (600, 64)])
def test_thin_photos_are_refused_at_the_edge_before_any_model_work(client, service, width, height):
    started = time.monotonic()
    body = {**SUBJECT, "images": [_png(width, height), None]}
    response = client.post(f"{service}/v1/subjects", json=body, headers=auth("well"), timeout=60)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(f"images[0] is {width} x {height} pixels")
    assert "8:1" in response.json()["detail"] and time.monotonic() - started < 10


@pytest.mark.parametrize("expires", ["%C2%B2", "9" * 5000, "1" + "0" * 30, "+1"], ids=short)
def test_a_malformed_expiry_is_403_never_500(client, service, expires):
    key = f"subjects/{'0' * 32}/images/0000000000000-00000000/000.png"
    response = client.get(f"{service}/v1/artifacts/{key}?expires={expires}&signature=00", timeout=30)
    assert response.status_code == 403 and "no valid signature" in response.json()["detail"]


@pytest.mark.parametrize("signature", ["%C3%A9", "ZZ", "0" * 65], ids=short)
def test_a_malformed_signature_is_403_never_500(client, service, signature):
    key = f"subjects/{'0' * 32}/images/0000000000000-00000000/000.png"
    response = client.get(f"{service}/v1/artifacts/{key}?expires=999999999999&signature={signature}", timeout=30)
    assert response.status_code == 403 and "no valid signature" in response.json()["detail"]


@pytest.mark.parametrize("path, key, status", [("/v1/artifacts/x", None, 405), ("/x", None, 404),
                                                ("/v1/stories", "well", 422)])
def test_a_body_of_escaped_quotes_is_answered_at_once(client, service, path, key, status):
    body = b'"' + b'\\"' * 32768  # 64 KB: its JSON check held the event loop 14 s
    started = time.monotonic()
    response = client.post(service + path, data=body, timeout=60,
                           headers={**(auth(key) if key else {}), "Content-Type": "application/json"})
    assert response.status_code == status and time.monotonic() - started < 5


def test_new_images_whose_seeds_would_pass_the_largest_are_422(client, service):
    made = client.post(f"{service}/v1/subjects", json={**SUBJECT, "seed": 2**63 - 3}, headers=auth("well"), timeout=300)
    assert made.status_code == 200, made.text
    images = {"prompts": ["a photo of a cat in the snow"] * 2}  # no seeds: they continue 2**63 - 2
    response = client.post(f"{service}/v1/subjects/{made.json()['subject_id']}/images", json=images,
                           headers=auth("well"), timeout=60)
    assert response.status_code == 422 and "give 'seeds'" in response.json()["detail"]


@pytest.mark.parametrize("last_event_id", [b"\xb2", "²".encode(), b"9" * 5000, b"-1", b"0x1"], ids=short)
def test_a_malformed_last_event_id_is_ignored_never_500(service, store_root, last_event_id):
    async def scenario():
        await _streams_released(service, store_root)
        job = running_job(store_root, "well")
        stream = await HeldStream.open(service, f"/v1/jobs/{job}/events",
                                       {**auth("well"), "Last-Event-ID": last_event_id.decode("latin-1")})
        try:
            assert stream.answer.status == 200, stream.answer
            assert b"id: 0\n" in await stream.first_bytes()
        finally:
            stream.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("field, value", [
    ("seed", '"1"'), ("seed", "true"), ("seed", "1.0"), ("mask_dropout", "false"), ("steps", '"3"'),
    ("seed", "9" * 5000), ("guidance_scale", "1" + "0" * 4999),
], ids=short)
def test_numbers_in_bodies_are_never_coerced_and_never_a_400(client, service, field, value):
    # n_anchors past the prompts too: a body that got past the field's check would say so instead.
    body = ('{"prompts": ["a cat"], "subjects": ["cat"], "n_anchors": 2, "%s": %s}' % (field, value)).encode()
    response = client.post(f"{service}/v1/stories", data=body, timeout=30,
                           headers={**auth("well"), "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert field in detail or "more than 100 digits" in detail, detail


@pytest.mark.parametrize("limit", ["%C2%B2", "+5", "5.0", " 5", "1_0", "9" * 5000], ids=short)
def test_a_query_number_is_plain_digits(client, service, limit):
    response = client.get(f"{service}/v1/subjects?limit={limit}", headers=auth("well"), timeout=30)
    assert response.status_code == 422 and "limit" in response.json()["detail"]


@pytest.mark.parametrize("path, methods", [
    ("/v1/subjects", "GET, OPTIONS, POST"), (f"/v1/subjects/{'0' * 32}", "DELETE, GET, OPTIONS"),
    (f"/v1/jobs/{'0' * 32}", "DELETE, GET, OPTIONS"), ("/healthz", "GET, OPTIONS"),
])
def test_options_and_405_list_every_method_of_the_path(client, service, path, methods):
    options = client.options(service + path, timeout=30)
    assert options.status_code == 204 and options.headers["allow"] == methods
    refused = client.put(service + path, headers=auth("well"), timeout=30)
    assert refused.status_code == 405 and refused.headers["allow"] == methods
    assert methods in refused.json()["detail"]


@pytest.mark.parametrize("where, char", [
    ("prompts", "\u202e"), ("prompts", "\u200b"), ("prompts", "\u2066"), ("prompts", "\u2069"),
    ("prompts", "\ufeff"), ("subjects", "\u200b"), ("subjects", "\u202e"),
])
def test_invisible_formatting_characters_are_refused_by_field_and_position(client, service, where, char):
    body = {"prompts": ["a cat", "a cat on a boat"], "subjects": ["cat"]}
    body[where] = [f"{body[where][0]}{char}x"] + body[where][1:]
    response = client.post(f"{service}/v1/subjects", json=body, headers=auth("well"), timeout=30)
    assert response.status_code == 422, response.text
    position = len(body[where][0]) - 2
    assert f"{where}[0]" in response.json()["detail"] and f"U+{ord(char):04X}" in response.json()["detail"]
    assert f"at {position}" in response.json()["detail"]


def test_the_probes_answer_at_once_while_the_replica_is_full(service, store_root):
    """Streams and slow bodies together fill what a replica admits: other requests get 503 with
    Retry-After at once, and the probes still answer."""
    async def scenario():
        await _streams_released(service, store_root)
        stop = asyncio.Event()

        async def trickle(key: str) -> None:
            while not stop.is_set():
                answer = await slow_body(service, "/v1/subjects", auth(key), 4000, 0.5, give_up_s=30)
                if answer.seconds < 0.5:  # turned away at once: a pause, not a flood
                    await asyncio.sleep(0.5)

        jobs = [running_job(store_root, f"k{i}") for i in range(4)]
        streams = await asyncio.gather(*[HeldStream.open(service, f"/v1/jobs/{j}/events", auth(f"k{i}"))
                                         for i, j in enumerate(jobs) for _ in range(STREAMS_PER_KEY)])
        bodies = [asyncio.ensure_future(trickle(f"k{i % 10}")) for i in range(24)]
        try:
            await asyncio.sleep(1.0)
            times = await _probe_times(service, 30)
            busy = [await request(service, "GET", "/v1/subjects", auth("well"), timeout_s=10) for _ in range(5)]
        finally:
            stop.set()
            for s in streams:
                s.close()
            await asyncio.gather(*bodies)
        assert statistics.quantiles(times, n=100)[98] < 0.5, times
        assert any(b.status == 503 for b in busy), busy
        assert all(b.status in (200, 503) and (b.status == 200 or b.headers.get("retry-after")) for b in busy), busy

    asyncio.run(scenario())
    assert http().get(f"{service}/healthz", timeout=10).status_code == 200


async def _streams_released(service: str, store_root: Path) -> None:
    """Until the streams of the tests before have been given back (the proxy tells the replica
    of each closed connection within moments)."""
    job = running_job(store_root, "well")
    deadline = time.monotonic() + 20
    while True:
        probe = await HeldStream.open(service, f"/v1/jobs/{job}/events", auth("well"))
        probe.close()
        if probe.answer.status == 200 or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.5)
