"""The story flow on its own (deployments/flow/story_flow.py): a plan goes anchors -> fan-out ->
store with typed messages, reports each step and image to its sink, resumes without making
again what is stored, and leaves nothing behind when it fails. The model deployments are stand-in
handles here; the real ones are the service suites' business."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from consistory import ConsiStoryConfig
from consistory.progress import StepProgress
from deployments.artifact_store import LocalArtifactStore
from deployments.errors import ServiceError
from deployments.flow.cache_refs import CacheRefs
from deployments.flow.plans import Plan, Uploads
from deployments.flow.story_flow import StoryFlow
from deployments.flow.slots import held_slots
from deployments.flow.subjects import forgotten_key, owner_key, quota_prefix, record_key
from deployments.messages import AnchorRequest, AnchorsResult, CacheHandle, ImageRequest, ImageResult

STEP = StepProgress(pass_index=1, step=0, steps=1, done=1, total=1)
HANDLE = CacheHandle(header="header-ref", chunks=(), nbytes=0)


class Handle:
    """What the flow uses of a Serve DeploymentHandle, answering from `answer(request)`."""

    def __init__(self, answer, calls: list) -> None:
        self.answer, self.calls, self.opts = answer, calls, {}

    def options(self, **opts) -> "Handle":
        handle = Handle(self.answer, self.calls)
        handle.opts = {**self.opts, **opts}
        return handle

    def __getattr__(self, method: str):
        handle = self

        class Method:
            @staticmethod
            def remote(request):
                handle.calls.append((method, handle.opts, request))
                if method.endswith("_stream"):
                    async def stream():
                        yield STEP
                        yield handle.answer(request)
                    return stream()
                async def call():
                    return handle.answer(request)
                return call()

        return Method


def _anchors(request: AnchorRequest) -> AnchorsResult:
    return AnchorsResult(pngs=[b"anchor"] * len(request.prompts), seeds=[request.seed + i for i in range(len(request.prompts))],
                         cache=HANDLE)


def _image(request: ImageRequest) -> ImageResult:
    if request.prompt == "fails":
        raise ServiceError(503, "the generator is at capacity; retry later", 1)
    return ImageResult(png=request.prompt.encode(), seed=request.seed, cache_source="object_store")


class Sink:
    def __init__(self) -> None:
        self.heard_steps, self.heard_images = [], []

    async def step(self, indices, progress) -> None:
        self.heard_steps.append((list(indices), progress))

    async def stored(self, image) -> None:
        self.heard_images.append(image.index)


@pytest.fixture
def flow(tmp_path: Path):
    calls: list = []
    store = LocalArtifactStore(tmp_path)
    flow = StoryFlow(Handle(_anchors, calls), Handle(_image, calls), store, CacheRefs(4), retry_after_s=1)
    flow.calls = calls
    return flow


def story(prompts: list[str], n_anchors: int = 2, **fields) -> Plan:
    controls = tuple(b"control-%d" % i for i in range(len(prompts)))
    return Plan(kind="story", subject_id="a" * 32, request_id="0000000000001-00000000", owner="alice",
                prompts=tuple(prompts), seeds=tuple(10 + i for i in range(len(prompts))), subjects=("cat",),
                n_anchors=n_anchors, config=ConsiStoryConfig(), uploads=Uploads(controls=controls, control_scale=0.5),
                **fields)


def test_a_story_is_anchors_then_one_typed_call_per_image_each_stored(flow) -> None:
    outcome = asyncio.run(flow.run(story(["cat 0", "cat 1", "cat 2", "cat 3"])))
    assert [i.index for i in outcome.images] == [0, 1, 2, 3] and [i.seed for i in outcome.images] == [10, 11, 12, 13]
    assert all(flow.store.get(i.key) == i.png for i in outcome.images)
    (anchor_call, *image_calls) = flow.calls
    method, _, anchors = anchor_call
    assert method == "create" and anchors.seed == 10 and isinstance(anchors.config, ConsiStoryConfig)
    assert anchors.prompts == ("cat 0", "cat 1") and anchors.controls == (b"control-0", b"control-1")
    for (method, opts, request), index in zip(image_calls, (2, 3)):
        assert method == "generate" and opts == {"multiplexed_model_id": "a" * 32}
        assert request.cache is HANDLE and request.control == b"control-%d" % index and request.control_scale == 0.5
    assert {"anchors_s", "images_s", "first_image_s", "total_s"} <= set(outcome.timings)


def test_a_sink_hears_each_step_and_image_and_a_resumed_plan_skips_what_is_stored(flow) -> None:
    sink = Sink()
    asyncio.run(flow.run(story(["cat 0", "cat 1", "cat 2", "cat 3"]), sink=sink, done={0, 1, 3}))
    assert [(method, opts.get("stream")) for method, opts, _ in flow.calls] == [("generate_stream", True)]
    assert sink.heard_steps == [([2], STEP)] and sink.heard_images == [2]


def test_a_failed_answer_leaves_no_subject_behind(flow) -> None:
    with pytest.raises(ServiceError) as raised:
        asyncio.run(flow.answer(story(["cat 0", "cat 1", "fails"]), max_subjects=5))
    assert raised.value.status_code == 503 and raised.value.headers["Retry-After"] == "1"
    assert list(flow.store.list_prefix("subjects/")) == [] and not flow.store.exists(owner_key("alice", "a" * 32))
    assert flow.refs.get("a" * 32) is None


class SlowStore(LocalArtifactStore):
    """A local store whose create-if-absent (the quota's slots) takes a while, as S3's can."""

    def create_exclusive(self, key, data, content_type):
        time.sleep(0.3)
        return super().create_exclusive(key, data, content_type)


def test_a_client_that_leaves_while_its_subject_is_claimed_holds_no_place(tmp_path: Path) -> None:
    calls: list = []
    flow = StoryFlow(Handle(_anchors, calls), Handle(_image, calls), SlowStore(tmp_path), CacheRefs(4), 1)

    async def scenario():
        answering = asyncio.ensure_future(flow.answer(story(["cat 0", "cat 1"]), max_subjects=5))
        await asyncio.sleep(0.1)  # the claim's write is under way in its thread
        answering.cancel()
        with pytest.raises(asyncio.CancelledError):
            await answering
        for _ in range(100):  # the claim lands, then is undone (the subject marked forgotten first)
            await asyncio.sleep(0.1)
            if released():
                break

    def released() -> bool:
        store = flow.store
        return (store.exists(forgotten_key("a" * 32)) and not store.exists(owner_key("alice", "a" * 32))
                and held_slots(store, quota_prefix("alice")) == [])

    asyncio.run(scenario())
    assert released() and calls == []


def test_images_of_a_subject_deleted_meanwhile_are_removed_and_404(flow) -> None:
    plan = Plan(kind="images", subject_id="a" * 32, request_id="0000000000001-00000000", owner=None,
                prompts=("cat 5",), seeds=(5,))
    with pytest.raises(ServiceError) as raised:
        asyncio.run(flow.answer(plan))
    assert raised.value.status_code == 404 and "deleted while its images were made" in raised.value.detail
    assert list(flow.store.list_prefix("subjects/")) == []
    flow.store.put(record_key("a" * 32), b"{}", "application/json")
    assert [i.seed for i in asyncio.run(flow.answer(plan)).images] == [5]
