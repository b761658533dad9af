"""Quotas and the job queue behind a load balancer, on a real local Ray Serve app over HTTP (tiny
preset) with two Ingress replicas sharing one store, one job runner each, and a Generator whose
own queue holds two calls: parallel creates never pass a key's `max_subjects`, accepted jobs wait
in order for capacity and none fails for it, a key's queued jobs are capped, a queued job is
cancelled at once, and queued jobs outlive the Ingress replicas that accepted them."""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import pytest
import requests
from service_helpers import (
    REQUEST_TIMEOUT_S, http, kill_replicas, local_service, ok_json, replica_actor_names, tiny_service_args,
    wait_replaced
)
from service_helpers import store_root  # noqa: F401 (fixtures)

from deployments.edge.api_keys import hash_token, new_token

APP = "consistory"
TOKENS = {name: new_token() for name in ("alice", "bob", "carol")}
KEYS = [{"name": "alice", "sha256": hash_token(TOKENS["alice"]), "max_subjects": 3},
        {"name": "bob", "sha256": hash_token(TOKENS["bob"]), "max_queued_jobs": 2},
        {"name": "carol", "sha256": hash_token(TOKENS["carol"])}]
SUBJECT = {"prompts": ["a photo of a cat in the park", "a photo of a cat on the beach"], "subjects": ["cat"]}
STORY = {**SUBJECT, "prompts": SUBJECT["prompts"] + ["a cat in the snow", "a cat on a sofa"]}
LONG = {**STORY, "steps": 50, "height": 256, "width": 256}
FINISHED = ("succeeded", "failed", "cancelled")
WAIT_S = 900  # bounds for a machine shared with other heavy work


@pytest.fixture(scope="module")
def service(store_root: Path):
    args = tiny_service_args(
        {"kind": "local", "root": str(store_root)}, generators=1, auth={"keys": KEYS},
        limits={"max_prompts": 6, "max_height": 256, "max_width": 256, "max_steps": 50},
        ingress={"num_cpus": 0.05, "min_replicas": 2, "max_replicas": 2, "max_ongoing_requests": 32,
                 "max_queued_requests": 64},
        generator={"num_cpus": 0.2, "min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 1,
                   "max_queued_requests": 1},
        jobs={"runners_per_replica": 1},
    )
    with local_service(args) as base_url:
        yield base_url


def as_key(name: str) -> requests.Session:
    session = http()
    session.headers["Authorization"] = f"Bearer {TOKENS[name]}"
    return session


def submit(service: str, name: str, body: dict) -> requests.Response:
    return as_key(name).post(f"{service}/v1/jobs", json=body, timeout=REQUEST_TIMEOUT_S)


def status(job: dict, name: str) -> dict:
    return ok_json(as_key(name).get(job["status_url"], timeout=REQUEST_TIMEOUT_S))


def wait_until(job: dict, name: str, states: tuple[str, ...] = FINISHED) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        state = status(job, name)
        if state["status"] in states:
            return state
        time.sleep(0.5)
    raise TimeoutError(f"job {job['job_id']} not {states} in {WAIT_S} s")


def test_parallel_creates_never_pass_the_subject_quota(service):
    """24 at once, synchronous creates and jobs alike, spread over both Ingress replicas."""
    def one(i: int) -> requests.Response:
        body = {**SUBJECT, "seed": i}
        if i % 2:
            return submit(service, "alice", {"subject": body})
        return as_key("alice").post(f"{service}/v1/subjects", json=body, timeout=REQUEST_TIMEOUT_S)

    with concurrent.futures.ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(one, range(24)))
    won = [a for a in answers if a.status_code in (200, 202)]
    refused = [a for a in answers if a.status_code == 429]
    assert len(won) + len(refused) == 24 and 1 <= len(won) <= 3, [a.status_code for a in answers]
    for answer in refused:  # waiting does not help: the answer says what to delete instead
        assert "retry-after" not in answer.headers and "DELETE /v1/subjects" in answer.json()["detail"]
    for job in (a.json() for a in won if a.status_code == 202):
        assert wait_until(job, "alice")["status"] == "succeeded"
    owned = ok_json(as_key("alice").get(f"{service}/v1/subjects", timeout=30))["subject_ids"]
    assert len(owned) == len(won) <= 3


def test_accepted_jobs_wait_their_turn_and_none_fails_for_capacity(service):
    """Six stories at once: two run (one runner per Ingress replica) and press on a Generator
    that queues two calls; the others wait in order, told their place."""
    jobs = [submit(service, "carol", {"story": {**STORY, "seed": 100 + i}}) for i in range(6)]
    assert all(j.status_code == 202 for j in jobs), [j.text for j in jobs]
    jobs = [j.json() for j in jobs]
    places = [status(j, "carol").get("queue_position") for j in jobs]
    assert any(p is not None for p in places), places
    assert [wait_until(j, "carol")["status"] for j in jobs] == ["succeeded"] * 6
    last = read_statuses(jobs[-1], "carol")
    told = [s["queue_position"] for s in last if s["status"] == "queued"]
    assert told and told[0] >= 1 and told == sorted(told, reverse=True), last
    assert [s["status"] for s in last if s["status"] != "queued"] == ["running", "succeeded"]


def read_statuses(job: dict, name: str) -> list[dict]:
    """The data of every status event of a finished job, in order."""
    found = []
    with as_key(name).get(job["events_url"], stream=True, timeout=REQUEST_TIMEOUT_S) as response:
        kind = None
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: ") and kind == "status":
                found.append(json.loads(line[len("data: "):]))
    return found


def test_a_keys_queued_jobs_are_capped_and_a_queued_job_is_cancelled_at_once(service, store_root):
    busy = [submit(service, "carol", {"story": {**LONG, "seed": i}}).json() for i in range(2)]
    for job in busy:  # both runners are taken: what bob sends waits
        wait_until(job, "carol", ("running",))
    first, second = (submit(service, "bob", {"story": {**STORY, "seed": i}}) for i in range(2))
    assert first.status_code == second.status_code == 202
    over = submit(service, "bob", {"story": STORY})
    assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
    assert "has 2 jobs queued or running, its limit" in over.json()["detail"]

    queued = first.json()
    assert status(queued, "bob")["queue_position"] in (0, 1, 2)
    cancelled = as_key("bob").delete(queued["status_url"], timeout=REQUEST_TIMEOUT_S)
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert not (store_root / "subjects" / queued["subject_id"]).exists()
    assert submit(service, "bob", {"story": STORY}).status_code == 202  # its place is free again
    for job in busy:
        as_key("carol").delete(job["status_url"], timeout=REQUEST_TIMEOUT_S)
        assert wait_until(job, "carol")["status"] == "cancelled"


def test_queued_jobs_outlive_the_ingress_replicas_that_accepted_them(service):
    jobs = [submit(service, "carol", {"story": {**STORY, "seed": 200 + i}}).json() for i in range(4)]
    dead = set(replica_actor_names(APP, "Ingress"))
    kill_replicas(APP, "Ingress", timeout_s=300)
    wait_replaced(APP, "Ingress", dead, service, timeout_s=600)
    # Queued ones are started by the new replicas at once; running ones once their lease lapses.
    assert [wait_until(j, "carol")["status"] for j in jobs] == ["succeeded"] * 4
