"""Stories over a pool of model actors: one call in flight per actor, retried when an actor dies.

The driver keeps the queue, not Ray: a call goes to an actor only when that actor is free, so a
story whose actor dies is put back at the front and taken by the next free actor (another one
where there is another alive), and the order of work (a started story's parts before new stories,
so its anchor cache is dropped early) is ours to choose.

`--mode story`: one `make_story` call per story. `--mode anchors`: `make_anchors`, then the other
prompts in chunks of `extend_batch` (`extend` calls, on any actor, reading the cache from the
object store), then a `finish_story` task writing the grid and story.json.
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError, RayTaskError

from .destination import Destination
from .manifest import MANIFEST_EVERY_S, Manifest
from .model_actor import PartResult
from .plans import StoryPlan
from .story_output import finish_story, story_record

ACTOR_RESTARTS = 3  # a model actor lost to its node (OOM kill, preemption) comes back this often
POLL_S = 0.5  # how often the loop wakes without results, to refresh the bar and the manifest

EventHook = Callable[..., None]


class BatchAborted(Exception):
    """No model actor is left to run the remaining stories; a rerun resumes."""


@dataclass
class Slot:
    """One model actor, as the scheduler sees it."""

    index: int
    handle: Any
    busy: bool = False
    alive: bool = True
    deaths: int = 0
    restarting: bool = False  # dead, not yet loaded again: Ray fails its calls, so only pings
    ping_due: float | None = None  # when to ask the restarting actor for its `info` (monotonic)
    info: dict[str, Any] | None = None
    ready_at: float | None = None
    images: int = 0


@dataclass
class StoryState:
    plan: StoryPlan
    failures: int = 0
    ended: bool = False
    cache_ref: Any = None  # --mode anchors: the anchor cache in the object store
    waiting: list[tuple[int, ...]] = field(default_factory=list)  # chunks waiting for a cache
    anchors_pending: bool = False
    chunks_left: int = 0
    made: set[int] = field(default_factory=set)  # prompt positions whose image is stored
    seconds: float = 0.0
    actors: set[int] = field(default_factory=set)
    model_id: str = ""
    dtype: str = ""


@dataclass
class Task:
    kind: str  # "story", "anchors", "extend", "finish", or "ready" (an actor's model is loaded)
    story: StoryState | None
    indices: tuple[int, ...] = ()
    avoid: int | None = None  # the actor it last failed on


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt): .+")


def one_line(error: BaseException) -> str:
    """An error as one line: a task's own exception; for an actor that died of an exception
    (in its model loading, say) that exception's last line, not Ray's traceback around it."""
    cause = getattr(error, "cause", None)
    if isinstance(error, RayTaskError) and isinstance(cause, BaseException):
        error = cause
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    raised = [line for line in lines if _RAISED.match(line)]
    if isinstance(error, RayActorError) and raised:
        return raised[-1]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


class Scheduler:
    def __init__(self, slots: list[Slot], plans: list[StoryPlan], manifest: Manifest, destination: Destination,
                 mode: str, extend_batch: int, attempts: int, progress, on_event: EventHook | None = None) -> None:
        self.slots = slots
        self.manifest = manifest
        self.destination = destination
        self.mode = mode
        self.extend_batch = extend_batch
        self.attempts = attempts
        self.progress = progress
        self.on_event = on_event or (lambda *args, **kwargs: None)
        self.queue: deque[Task] = deque(Task("story" if mode == "story" else "anchors", StoryState(p)) for p in plans)
        self.in_flight: dict[Any, tuple[Task, Slot | None]] = {}
        self.finisher = ray.remote(finish_story).options(num_cpus=0)  # I/O only: never waits for a CPU
        self.done = self.failed = self.retries = self.images = 0
        self.last_death = ""

    # --- the loop ---
    def run(self) -> None:
        for slot in self.slots:
            self.in_flight[slot.handle.info.remote()] = (Task("ready", None), slot)
        last_write = time.monotonic()
        while True:
            self._dispatch()
            pending = [ref for ref, (task, _) in self.in_flight.items() if task.kind != "ready"]
            if not pending and not self._work_left():
                return
            if not any(slot.alive for slot in self.slots):
                raise BatchAborted(f"all {len(self.slots)} model actors died (last: {self.last_death}); "
                                   "rerun the same command to resume")
            if not self.in_flight:  # every task waits for another actor to be free
                time.sleep(POLL_S)
                continue
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=POLL_S)
            for ref in ready:
                self._collect(ref)
            self.progress.tick()
            if time.monotonic() - last_write > MANIFEST_EVERY_S:
                self.manifest.write()
                last_write = time.monotonic()

    def _work_left(self) -> bool:
        return any(not task.story.ended for task in self.queue)

    def _dispatch(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.alive and slot.restarting and slot.ping_due is not None and now >= slot.ping_due:
                slot.ping_due = None
                self.in_flight[slot.handle.info.remote()] = (Task("ready", None), slot)
            if slot.alive and not slot.busy and not slot.restarting:
                task = self._next_task_for(slot)
                if task is not None:
                    self._submit(task, slot)

    def _next_task_for(self, slot: Slot) -> Task | None:
        others_alive = any(s.alive and s is not slot for s in self.slots)
        for position, task in enumerate(self.queue):
            if task.story.ended:
                continue
            if task.avoid == slot.index and others_alive:
                continue  # retried elsewhere while another actor is alive
            del self.queue[position]
            return task
        while self.queue and self.queue[0].story.ended:
            self.queue.popleft()
        return None

    def _submit(self, task: Task, slot: Slot) -> None:
        story = task.story
        plan = story.plan
        if task.kind == "story":
            ref = slot.handle.make_story.remote(plan)
        elif task.kind == "anchors":
            ref, story.cache_ref = slot.handle.make_anchors.remote(plan)
        else:
            ref = slot.handle.extend.remote(plan, task.indices, story.cache_ref)
        slot.busy = True
        self.in_flight[ref] = (task, slot)
        self.on_event("started", story=plan.id, kind=task.kind, actor=slot.index)

    def _submit_finish(self, story: StoryState) -> None:
        timings = {"total_s": story.seconds}
        record = story_record(story.plan, story.model_id, story.dtype, "anchors", timings)
        self.in_flight[self.finisher.remote(self.destination, record)] = (Task("finish", story), None)

    # --- results ---
    def _collect(self, ref) -> None:
        task, slot = self.in_flight.pop(ref)
        if slot is not None and task.kind != "ready":
            slot.busy = False
        try:
            value = ray.get(ref)
        except RayActorError as error:
            self._actor_died(task, slot, error)
            return
        except (ObjectLostError, RayTaskError) as error:
            if isinstance(error, ObjectLostError) or isinstance(getattr(error, "cause", None), ObjectLostError):
                self._cache_lost(task, error)
            else:
                self._retry(task, one_line(error), avoid=slot.index if slot else None)
            return
        if task.kind == "ready":
            slot.info, slot.ready_at, slot.restarting = value, time.monotonic(), False
            self.progress.actor_ready()
            self.on_event("actor_ready", actor=slot.index, pid=value["pid"], load_s=value["load_s"])
        elif task.story.ended:
            return  # a late part of a story that already failed
        elif task.kind == "finish":
            self._story_done(task.story, value)
        else:
            self._part_done(task, slot, value)

    def _part_done(self, task: Task, slot: Slot, result: PartResult) -> None:
        story = task.story
        if result.error is not None:
            self._fail(story, result.error, story.failures + 1)  # the story's input: not retried
            return
        new = set(result.indices) - story.made  # anchors made again after a lost cache count once
        story.made.update(new)
        story.seconds += result.seconds
        story.actors.add(slot.index)
        story.model_id, story.dtype = result.model_id, result.dtype
        slot.images += len(result.indices)
        self.images += len(new)
        self.progress.images_done(len(new))
        if task.kind == "story":
            self._story_done(story, result.record)
        elif task.kind == "anchors":
            story.anchors_pending = False
            if not story.waiting and story.chunks_left == 0:  # the first time: every other prompt
                rest = list(range(story.plan.n_anchors, len(story.plan.spec.prompts)))
                story.waiting = [tuple(rest[i:i + self.extend_batch]) for i in range(0, len(rest), self.extend_batch)]
                story.chunks_left = len(story.waiting)
            # At the front, in order: a started story's parts go before new stories.
            self.queue.extendleft(Task("extend", story, chunk) for chunk in reversed(story.waiting))
            story.waiting = []
            if story.chunks_left == 0:
                self._submit_finish(story)
        else:
            story.chunks_left -= 1
            if story.chunks_left == 0:
                story.cache_ref = None  # no reference left: Ray frees the cache
                self._submit_finish(story)

    def _story_done(self, story: StoryState, record: dict[str, Any]) -> None:
        story.ended = True
        story.cache_ref = None
        self.done += 1
        self.manifest.record_done(record, attempts=story.failures + 1, actors=story.actors)
        self.progress.story_done()
        self.on_event("done", story=story.plan.id)

    # --- failures ---
    def _actor_died(self, task: Task, slot: Slot, error: BaseException) -> None:
        # "Unavailable" while restarting is Ray bouncing a call: the death before it was counted.
        bounced = slot.restarting and isinstance(error, ActorUnavailableError)
        if not bounced:
            slot.deaths += 1
            slot.alive = slot.deaths <= ACTOR_RESTARTS
            self.last_death = one_line(error)
            self.on_event("actor_died", actor=slot.index, alive=slot.alive)
        if slot.alive:  # no work until the restarted actor says its model is loaded again
            slot.restarting = True
            if task.kind == "ready" or slot.ping_due is None:
                slot.ping_due = time.monotonic() + (POLL_S if bounced else 0.0)
        if task.kind != "ready":
            self._retry(task, f"its model actor died ({one_line(error)})", avoid=slot.index)

    def _cache_lost(self, task: Task, error: BaseException) -> None:
        """The anchor cache is gone from the object store (its node died): make the anchors again,
        then the chunks that still need it."""
        story = task.story
        if story.ended:
            return
        story.waiting.append(task.indices)
        if not story.anchors_pending:
            story.anchors_pending = True
            story.cache_ref = None
            self._retry(Task("anchors", story), f"its anchor cache was lost ({one_line(error)})")

    def _retry(self, task: Task, reason: str, avoid: int | None = None) -> None:
        story = task.story
        if story.ended:
            return
        story.failures += 1
        if story.failures >= self.attempts:
            self._fail(story, f"{reason}; gave up after {story.failures} attempts", story.failures)
            return
        self.retries += 1
        self.on_event("retry", story=story.plan.id, kind=task.kind, reason=reason)
        if task.kind == "finish":
            self._submit_finish(story)
        else:
            task.avoid = avoid
            self.queue.appendleft(task)

    def _fail(self, story: StoryState, error: str, attempts: int) -> None:
        story.ended = True
        story.cache_ref = None
        self.failed += 1
        self.manifest.record_failed(story.plan.id, story.plan.spec.source, error, story.plan.key, attempts)
        self.progress.story_failed(len(story.plan.spec.prompts) - len(story.made))
        self.on_event("failed", story=story.plan.id, error=error)
