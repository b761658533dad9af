"""Hostile and well-behaved clients at once against one local service (API keys on, tiny
preset), for about a minute: 200 event streams, 32 bodies sent a byte a second (half without a
key) and oversized headers, while well-behaved clients make images, follow jobs and the probes
poll. The probes answer within 0.5 s at the 99th percentile, every well-behaved request is
answered (200, or 503/429 with Retry-After, after which it is retried), and every image answered
can be fetched: nothing is lost."""

from __future__ import annotations

import collections
import json
import multiprocessing
import statistics
import threading
import time
from pathlib import Path

import pytest
from hostile_clients import running_job
from hostile_storm import Storm, run
from service_helpers import REQUEST_TIMEOUT_S, http, local_service, ok_json, tiny_service_args
from service_helpers import store_root  # noqa: F401 (fixtures)

from deployments.edge.api_keys import hash_token, new_token

pytestmark = pytest.mark.soak
SOAK_S = 60.0
HOSTILE = [f"h{i}" for i in range(10)]
WELL = ["well"]  # three image makers and a job follower share one key (and its subject)
TOKENS = {name: new_token() for name in HOSTILE + WELL}
MAX_STREAMS = 30  # half of the 60 requests the edge admits


@pytest.fixture(scope="module")
def service(store_root: Path):
    args = tiny_service_args(
        {"kind": "local", "root": str(store_root)}, generators=1,
        auth={"enabled": True, "keys": [{"name": n, "sha256": hash_token(t)} for n, t in TOKENS.items()]},
        # The replica takes every connection of the storm (~250) and the edge admits 60 of them:
        # the requests it refuses never fill the replica's slots, so a probe never waits in the
        # proxy's queue.
        ingress={"num_cpus": 0.05, "max_ongoing_requests": 512, "max_queued_requests": 128},
        edge={"max_requests": 60, "body_allowance_s": 2.0},
    )
    with local_service(args) as base_url:
        yield base_url


def as_key(name: str):
    session = http()
    session.headers["Authorization"] = f"Bearer {TOKENS[name]}"
    return session


def answered(response, tally: collections.Counter, what: str) -> bool:
    """Counts an answer; True if it is a 200, False if it says to retry (after sleeping as told)."""
    tally[f"{what} {response.status_code}"] += 1
    if response.status_code in (200, 202):
        return True
    assert response.status_code in (429, 503) and int(response.headers["retry-after"]) >= 1, response.text
    time.sleep(int(response.headers["retry-after"]))
    return False


def make_images(service: str, subject_id: str, stop: threading.Event, tally, made: list) -> None:
    session, n = as_key("well"), 0
    while not stop.is_set():
        body = {"prompts": [f"a photo of a cat number {n}"], "seeds": [1000 + n]}
        response = session.post(f"{service}/v1/subjects/{subject_id}/images", json=body, timeout=REQUEST_TIMEOUT_S)
        if answered(response, tally, "images"):
            made.append(response.json()["images"][0]["url"])
            n += 1


def follow_jobs(service: str, subject_id: str, stop: threading.Event, tally, finished: list) -> None:
    session = as_key("well")
    while not stop.is_set():
        body = {"images": {"subject_id": subject_id, "prompts": ["a photo of a cat at dusk", "a cat in the rain"]}}
        response = session.post(f"{service}/v1/jobs", json=body, timeout=REQUEST_TIMEOUT_S)
        if not answered(response, tally, "job"):
            continue
        job = response.json()
        with session.get(job["events_url"], stream=True, timeout=REQUEST_TIMEOUT_S) as events:
            streamed = answered(events, tally, "job events")
            ids = [int(line[4:]) for line in events.iter_lines(decode_unicode=True) if line.startswith("id: ")] \
                if streamed else []
        assert ids == list(range(len(ids))), ids  # in order, none missed
        while True:
            record = session.get(job["status_url"], timeout=REQUEST_TIMEOUT_S)
            if answered(record, tally, "job status") and record.json()["status"] not in ("queued", "running"):
                break
            time.sleep(0.5)
        finished.append(record.json())


def probe(service: str, stop: threading.Event, latencies: list, statuses: collections.Counter) -> None:
    session, i = http(), 0
    while not stop.is_set():
        started = time.monotonic()
        response = session.get(f"{service}/{'healthz' if i % 2 else 'readyz'}", timeout=10)
        latencies.append(time.monotonic() - started)
        statuses[response.status_code] += 1
        i += 1
        time.sleep(0.1)


def test_a_storm_of_hostile_clients_starves_neither_the_probes_nor_well_behaved_clients(service, store_root):
    subject_id = ok_json(as_key("well").post(f"{service}/v1/subjects", timeout=REQUEST_TIMEOUT_S, json={
        "prompts": ["a photo of a cat in the park", "a photo of a cat on the beach"], "subjects": ["cat"], "seed": 3,
    }))["subject_id"]
    storm = Storm(service, {k: TOKENS[k] for k in HOSTILE}, {k: running_job(store_root, k) for k in HOSTILE},
                  seconds=SOAK_S + 10)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    hostile = context.Process(target=run, args=(storm, results), daemon=True)
    hostile.start()
    time.sleep(5)  # the streams are held and the bodies trickling before anyone measures

    stop, tally, made, finished = threading.Event(), collections.Counter(), [], []
    latencies, probe_statuses = [], collections.Counter()
    workers = [threading.Thread(target=make_images, args=(service, subject_id, stop, tally, made))
               for _ in range(3)]
    workers += [threading.Thread(target=follow_jobs, args=(service, subject_id, stop, tally, finished)),
                threading.Thread(target=probe, args=(service, stop, latencies, probe_statuses))]
    for worker in workers:
        worker.start()
    time.sleep(SOAK_S)
    stop.set()
    for worker in workers:
        worker.join(timeout=REQUEST_TIMEOUT_S * 2)
    storm_result = results.get(timeout=120)
    hostile.join(timeout=30)

    p50, p99 = statistics.median(latencies), statistics.quantiles(latencies, n=100)[98]
    print(json.dumps({"probes": {"count": len(latencies), "p50_s": round(p50, 4), "p99_s": round(p99, 4),
                                 "max_s": round(max(latencies), 4), "statuses": dict(probe_statuses)},
                      "well_behaved": dict(tally), "images_made": len(made), "jobs_finished": len(finished),
                      "hostile": storm_result}, indent=1))
    assert not any(worker.is_alive() for worker in workers)
    assert set(probe_statuses) == {200} and p99 < 0.5, (p50, p99, probe_statuses)
    assert made and finished, tally
    session = as_key("well")
    assert all(session.get(url, timeout=30).status_code == 200 for url in made)  # nothing lost
    assert all(job["status"] == "succeeded" and len(job["result"]["images"]) == 2 for job in finished), finished
    counts = storm_result["counts"]
    assert storm_result["most_held"] <= MAX_STREAMS and counts.get("stream 429", 0) > 0, storm_result
    # Read before its key was checked, a body this slow would have met the body deadline (408).
    assert counts.get("slow body without a key 401", 0) > 0 and set(
        k for k in counts if k.startswith("slow body without")) <= {
        "slow body without a key 401", "slow body without a key 503"}, counts
    assert all(k.endswith((" 408", " 503", " 0")) for k in counts if k.startswith("slow body with a key")), counts
    assert all(k.endswith(" 431") for k in counts if k.startswith("header")), counts
