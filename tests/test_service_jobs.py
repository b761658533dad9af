"""Jobs on a real local Ray Serve app over HTTP (tiny preset): 202 at once, progress step by step,
Server-Sent Events that resume from Last-Event-ID, cancellation that stops the model replicas,
Idempotency-Key, ownership, and a job that outlives the Ingress replica running it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests
from service_helpers import (
    REQUEST_TIMEOUT_S,
    assert_same_pixels,
    http,
    image_pixels,
    local_service,
    kill_replicas,
    ok_json,
    replica_actor_names,
    tiny_service_args,
    wait_replaced,
)

from consistory import ConsiStoryConfig
from deployments.edge.api_keys import hash_token, new_token

APP = "consistory"
TOKENS = {name: new_token() for name in ("alice", "bob")}
STEPS, SIZE = 6, 64
STORY = {"prompts": ["a photo of a cat in the park", "a photo of a cat on the beach", "a cat in the snow",
                     "a cat on a sofa"], "subjects": ["cat"], "seed": 11, "steps": STEPS, "height": SIZE, "width": SIZE}
LONG = {"prompts": [f"a cat number {i}" for i in range(6)], "subjects": ["cat"], "steps": 50, "height": 256, "width": 256}
SUBJECT = {"prompts": STORY["prompts"][:2], "subjects": ["cat"], "steps": STEPS, "height": SIZE, "width": SIZE}


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def service(store_root: Path):
    keys = [{"name": name, "sha256": hash_token(token)} for name, token in TOKENS.items()]
    args = tiny_service_args({"kind": "local", "root": str(store_root)}, generators=1,
                             auth={"enabled": True, "keys": keys},
                             limits={"max_prompts": 6, "max_height": 256, "max_width": 256, "max_steps": 50})
    with local_service(args) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def library(tiny_pipe):
    return tiny_pipe


def as_key(name: str) -> requests.Session:
    session = http()
    session.headers["Authorization"] = f"Bearer {TOKENS[name]}"
    return session


def start(service: str, body: dict, name: str = "alice", **headers: str) -> dict:
    response = as_key(name).post(f"{service}/v1/jobs", json=body, headers=headers, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 202, response.text
    return response.json()


def wait_finished(job: dict, name: str = "alice", timeout_s: float = 900) -> dict:
    deadline = time.monotonic() + timeout_s
    session = as_key(name)
    while time.monotonic() < deadline:
        state = ok_json(session.get(job["status_url"], timeout=30))
        if state["status"] in ("succeeded", "failed", "cancelled"):
            return state
        time.sleep(0.5)
    raise TimeoutError(f"job {job['job_id']} did not finish in {timeout_s} s")


def read_events(url: str, name: str = "alice", last_event_id: str | None = None, stop_after: int | None = None,
                until: str | None = None):
    """The stream's events, to its end, or to the `stop_after`-th one, or to the first of kind `until`."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    events, current = [], {}
    with as_key(name).get(url, headers=headers, stream=True, timeout=REQUEST_TIMEOUT_S) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines(decode_unicode=True):
            if line == "":
                if "event" in current:
                    events.append({"id": int(current["id"]), "event": current["event"], "data": json.loads(current["data"])})
                    if (stop_after is not None and len(events) >= stop_after) or events[-1]["event"] == until:
                        return events
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                current[field] = value
    return events


def test_a_story_job_streams_progress_and_gives_the_librarys_images(service, library):
    job = start(service, {"story": STORY})
    # Answered before its work: nothing of it is made yet (however slow a loaded machine is).
    assert job["status"] in ("queued", "running") and job["progress"]["images_total"] == 4
    events = read_events(job["events_url"])
    kinds = [e["event"] for e in events]
    assert kinds[0] == "status" and events[-1] == {"id": events[-1]["id"], "event": "status",
                                                   "data": {"status": "succeeded"}}
    assert [e["id"] for e in events] == list(range(len(events)))
    steps = [r for e in events if e["event"] == "progress" for r in e["data"]["running"]]
    assert steps and all(0 <= r["step"] < STEPS and r["steps"] == STEPS for r in steps)
    assert sorted(e["data"]["index"] for e in events if e["event"] == "image") == [0, 1, 2, 3]

    state = wait_finished(job)
    assert state["status"] == "succeeded" and state["progress"]["images_done"] == 4
    config = ConsiStoryConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE)
    expected = library.generate_story(STORY["prompts"], STORY["subjects"], seed=STORY["seed"], config=config)
    session = as_key("alice")
    for image in state["result"]["images"]:
        assert_same_pixels(image_pixels(session, image), expected.images[image["index"]])

    # A client that reconnects with Last-Event-ID gets exactly what it missed.
    again = read_events(job["events_url"], last_event_id=str(events[2]["id"]))
    assert again == events[3:]


def test_a_subject_job_then_an_images_job(service):
    made = wait_finished(start(service, {"subject": {k: STORY[k] for k in ("subjects", "seed", "steps", "height", "width")}
                                         | {"prompts": STORY["prompts"][:2]}}))
    assert made["status"] == "succeeded" and len(made["result"]["images"]) == 2
    more = wait_finished(start(service, {"images": {"subject_id": made["subject_id"], "prompts": ["a cat in a hat"]}}))
    assert more["status"] == "succeeded" and more["result"]["images"][0]["index"] == 0


def test_bad_jobs_are_refused_before_any_work(service):
    alice = as_key("alice")
    for body, words in [({}, "exactly one"), ({"story": STORY, "subject": STORY}, "exactly one"),
                        ({"story": {**STORY, "prompts": ["a dog"]}}, "none of the subjects"),
                        ({"images": {"subject_id": "0" * 32, "prompts": ["a cat"]}}, "no subject"),
                        (STORY, 'wraps the request in one key: {"story"')]:
        response = alice.post(f"{service}/v1/jobs", json=body, timeout=30)
        assert response.status_code in (404, 422) and words in response.json()["detail"], response.text


def test_the_same_idempotency_key_gives_the_same_job_only_for_the_same_request(service):
    first = start(service, {"story": STORY}, **{"Idempotency-Key": "order-17"})
    second = start(service, {"story": STORY}, **{"Idempotency-Key": "order-17"})
    other = start(service, {"story": STORY}, **{"Idempotency-Key": "order-18"})
    assert first["job_id"] == second["job_id"] != other["job_id"]
    # The key again with another body: refused, never the first job passed off as its answer.
    changed = as_key("alice").post(f"{service}/v1/jobs", json={"story": {**STORY, "seed": 12}},
                                   headers={"Idempotency-Key": "order-17"}, timeout=REQUEST_TIMEOUT_S)
    assert changed.status_code == 422, changed.text
    assert "already used with a different request" in changed.json()["detail"] and first["job_id"] in changed.text
    for job in (first, other):
        assert wait_finished(job)["status"] == "succeeded"


def test_a_job_belongs_to_its_key(service):
    job = start(service, {"story": STORY})
    bob = as_key("bob")
    for response in (bob.get(job["status_url"], timeout=30), bob.get(job["events_url"], timeout=30),
                     bob.delete(job["status_url"], timeout=30)):
        assert response.status_code == 404
    assert http().get(job["status_url"], timeout=30).status_code == 401
    assert wait_finished(job)["status"] == "succeeded"


def test_cancelling_stops_the_work_and_lists_the_finished_images(service):
    job = start(service, {"story": {**LONG, "n_anchors": 1}})
    read_events(job["events_url"], until="image")  # the anchor is made, the others are not yet
    answer = as_key("alice").delete(job["status_url"], timeout=30)
    assert answer.status_code == 202 and answer.json()["cancel_requested"] in (True, False)
    state = wait_finished(job)
    assert state["status"] == "cancelled" and state["progress"]["running"] == []
    assert 1 <= state["progress"]["images_done"] < len(LONG["prompts"])
    # What was made before the cancel is the job's result, and its subject stays for it.
    made = state["result"]["images"]
    assert len(made) == state["progress"]["images_done"] and made[0]["index"] == 0
    assert image_pixels(as_key("alice"), made[0]).shape == (256, 256, 3)
    # The model replicas stopped: a small job is served next, not after 5 x 50 more steps.
    assert wait_finished(start(service, {"story": STORY}))["status"] == "succeeded"


def test_a_story_cancelled_while_its_anchors_are_made_leaves_no_subject(service, store_root):
    job = start(service, {"story": LONG})
    read_events(job["events_url"], until="progress")  # a first step of the anchors
    assert as_key("alice").delete(job["status_url"], timeout=30).status_code == 202
    state = wait_finished(job)
    assert state["status"] == "cancelled" and state["progress"]["images_done"] == 0 and "result" not in state
    # Once the AnchorStage has made anchors after it, whatever it did with the cancelled ones is done.
    assert wait_finished(start(service, {"subject": {**SUBJECT, "seed": 31}}))["status"] == "succeeded"
    assert as_key("alice").get(f"{service}/v1/subjects/{job['subject_id']}", timeout=30).status_code == 404
    assert not (store_root / "subjects" / job["subject_id"]).exists()


def test_a_job_outlives_the_ingress_replica_running_it(service, library):
    story = {**STORY, "seed": 23, "steps": 30, "height": 128, "width": 128}
    job = start(service, {"story": story})
    read_events(job["events_url"], until="progress")  # it is running
    dead = set(replica_actor_names(APP, "Ingress"))
    # Bounds for a loaded machine: a new Ingress replica imports torch and loads a tokenizer.
    kill_replicas(APP, "Ingress", timeout_s=300)
    wait_replaced(APP, "Ingress", dead, service, timeout_s=600)
    state = wait_finished(job)  # taken over once the dead runner's lease expires
    assert state["status"] == "succeeded"
    statuses = [e["data"]["status"] for e in read_events(job["events_url"]) if e["event"] == "status"]
    assert statuses.count("running") == 2, statuses  # started, then taken over
    config = ConsiStoryConfig(num_inference_steps=30, height=128, width=128)
    expected = library.generate_story(story["prompts"], story["subjects"], seed=23, config=config)
    for image in state["result"]["images"]:
        assert_same_pixels(image_pixels(as_key("alice"), image), expected.images[image["index"]])
