"""The job queue, board and runner on a real local store, with no Serve: what happens to a job
when the service is upgraded or a replica stalls.

- Jobs left by a version of the service that stored no plan (`jobs/<id>/plan.json` came with the
  job queue) end, saying why, rather than stay queued or running for ever holding their key's
  places; the model deployments are never reached (a call to one fails the test).
- A runner whose replica stalled past its lease's expiry, while another replica took the job
  over, stops and writes nothing more.
- A client that leaves while its job is being accepted leaves a whole accepted job, not half of
  one."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from consistory import ConsiStoryConfig
from deployments.artifact_store import LocalArtifactStore
from deployments.flow import job_runner
from deployments.flow.cache_refs import CacheRefs
from deployments.flow.image_links import ImageLinks
from deployments.flow.job_board import JobBoard
from deployments.flow.jobs import JobRecord, active_key, job_slots_prefix, load_job, new_job_id, queue_key, save_job
from deployments.flow.leases import runner_lease_key
from deployments.flow.plans import Plan
from deployments.flow.slots import claim_slot, held_slots, slot_key
from deployments.flow.story_flow import StoryFlow
from deployments.flow.subjects import claim_subject, new_subject_id, owner_key
from deployments.settings import ServiceSettings


class Unreachable:
    def __getattr__(self, name):
        raise AssertionError(f"a job without a plan reached the model deployments ({name})")


class Stuck:
    """A deployment handle whose calls never answer (a model replica busy for ever)."""

    def options(self, **_) -> "Stuck":
        return self

    def __getattr__(self, method):
        class Method:
            @staticmethod
            def remote(request):
                async def never():
                    await asyncio.Event().wait()
                    yield None
                return never() if method.endswith("_stream") else asyncio.Event().wait()

        return Method


@pytest.fixture
def board(tmp_path: Path) -> JobBoard:
    store = LocalArtifactStore(tmp_path)
    flow = StoryFlow(Unreachable(), Unreachable(), store, CacheRefs(4), retry_after_s=1)
    return JobBoard(flow, ImageLinks(store, ServiceSettings()), replica="replica-a")


def old_job(store: LocalArtifactStore, status: str) -> JobRecord:
    """A job as the earlier version stored it: record, request and marks, no plan."""
    now = time.time() - 60
    job = JobRecord(job_id=new_job_id(), kind="story", owner="alice", subject_id=new_subject_id(),
                    request_id="0000000000001-00000000", status=status, created_at=now, updated_at=now,
                    images_total=3)
    job.job_slot = claim_slot(store, job_slots_prefix(job.owner), 10, job.job_id)
    claim_subject(store, job.owner, job.subject_id, 10)
    store.put(f"jobs/{job.job_id}/request.json", json.dumps({"prompts": ["a cat"] * 3}).encode(), "application/json")
    save_job(store, job)
    if status == "queued":
        store.put(queue_key(job), b"", "application/octet-stream")
    store.put(active_key(job.job_id), b"", "application/octet-stream")
    return job


def events(store: LocalArtifactStore, job_id: str) -> list[dict]:
    return [json.loads(store.get(a.key)) for a in store.list_prefix(f"jobs/{job_id}/events/")]


@pytest.mark.parametrize("status", ["queued", "running"])
def test_a_job_without_a_plan_fails_saying_why_and_frees_its_places(board, status) -> None:
    store = board.store
    job = old_job(store, status)
    asyncio.run(board.queue.work_once())
    after = load_job(store, job.job_id)
    assert after.status == "failed" and after.error["status"] == 409
    assert "earlier version" in after.error["detail"] and "send the request again" in after.error["detail"]
    assert events(store, job.job_id)[-1]["data"] == {"status": "failed", "error": after.error}
    assert not store.exists(active_key(job.job_id)) and not list(store.list_prefix("queue/"))
    assert held_slots(store, job_slots_prefix("alice")) == []
    assert not store.exists(owner_key("alice", job.subject_id))  # nothing delivered: no subject kept
    asyncio.run(board.queue.work_once())  # nothing is left for a later pass to find
    assert load_job(store, job.job_id).events == after.events


def test_an_unreadable_plan_fails_its_job_and_an_unreadable_record_holds_up_no_other(board) -> None:
    store = board.store
    unreadable_record, unreadable_plan = old_job(store, "queued"), old_job(store, "queued")
    store.put(f"jobs/{unreadable_record.job_id}/job.json", b"{not json", "application/json")
    store.put(f"jobs/{unreadable_plan.job_id}/plan.json", b'{"kind": "story"}', "application/json")
    asyncio.run(board.queue.work_once())
    after = load_job(store, unreadable_plan.job_id)
    assert after.status == "failed" and "cannot be read any more" in after.error["detail"]
    assert store.exists(active_key(unreadable_record.job_id))  # passed over, looked at again later


def test_cancelling_a_queued_job_without_a_plan_cancels_it(board) -> None:
    store = board.store
    job = old_job(store, "queued")
    answered = asyncio.run(board.cancel(load_job(store, job.job_id)))
    assert answered.status == "cancelled" and answered.error is None
    assert not store.exists(active_key(job.job_id)) and not list(store.list_prefix("queue/"))
    assert held_slots(store, job_slots_prefix("alice")) == []


def test_a_runner_whose_lease_was_taken_over_stops_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(job_runner, "RENEW_S", 0.2)
    store = LocalArtifactStore(tmp_path)
    flow = StoryFlow(Stuck(), Stuck(), store, CacheRefs(4), retry_after_s=1)
    board = JobBoard(flow, ImageLinks(store, ServiceSettings()), replica="replica-a")
    plan = Plan(kind="story", subject_id=new_subject_id(), request_id="0000000000001-00000000", owner="alice",
                prompts=("a cat", "a cat", "a cat"), seeds=(1, 2, 3), subjects=("cat",), n_anchors=2,
                config=ConsiStoryConfig())

    async def scenario():
        sweeping = asyncio.ensure_future(board.sweep_forever())
        job = await board.submit(plan, request_sha256="0" * 64)
        for _ in range(100):  # the queue starts it here
            await asyncio.sleep(0.05)
            if load_job(store, job.job_id).status == "running":
                break
        runner = board.queue.runners[job.job_id]
        # replica-a stalled past its lease; replica-b took the job over and now runs it.
        store.put(runner_lease_key(job.job_id), json.dumps({"owner": "replica-b", "expires_at": time.time() + 60}).encode(),
                  "application/json")
        written = load_job(store, job.job_id)
        await asyncio.wait_for(runner.task, timeout=10)
        sweeping.cancel()
        return job, written

    job, written = asyncio.run(scenario())
    after = load_job(store, job.job_id)
    assert after.status == "running" and after.events == written.events  # nothing more written
    assert json.loads(store.get(runner_lease_key(job.job_id)))["owner"] == "replica-b"
    assert store.exists(active_key(job.job_id))  # still replica-b's to finish


class SlowStore(LocalArtifactStore):
    """A local store whose create-if-absent (quota slots, leases) takes a while, as S3's can."""

    def create_exclusive(self, key, data, content_type):
        time.sleep(0.3)
        return super().create_exclusive(key, data, content_type)


def test_a_client_that_leaves_while_its_job_is_accepted_leaves_a_whole_job(tmp_path: Path) -> None:
    store = SlowStore(tmp_path)
    board = JobBoard(StoryFlow(Stuck(), Stuck(), store, CacheRefs(4), 1), ImageLinks(store, ServiceSettings()),
                     replica="replica-a")
    plan = Plan(kind="images", subject_id=new_subject_id(), request_id="0000000000001-00000000", owner="alice",
                prompts=("a cat",), seeds=(1,))

    async def scenario():
        submitting = asyncio.ensure_future(board.submit(plan, request_sha256="0" * 64))
        await asyncio.sleep(0.1)  # its job slot is being claimed, in a thread
        submitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submitting
        for _ in range(100):  # the acceptance goes on; its last write is the job's active mark
            await asyncio.sleep(0.1)
            if list(store.list_prefix("active-jobs/")):
                break

    asyncio.run(scenario())
    jobs = [a.key.split("/")[1] for a in store.list_prefix("active-jobs/")]
    assert len(jobs) == 1
    job = load_job(store, jobs[0])
    assert job.status == "queued" and store.exists(queue_key(job))
    assert [(h.key, h.holder) for h in held_slots(store, job_slots_prefix("alice"))] == [
        (slot_key(job_slots_prefix("alice"), job.job_slot), job.job_id)]
