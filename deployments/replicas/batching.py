"""Concurrent requests of one model replica, made together: a batch per key.

Requests with the same key (for the Generator, `ImageRequest.batch_key`: one subject, one
control scale) can be made by one pipeline call, and each image of such a call is independent
of the others ("cached equals batch"), so a request's image is the same whether it was made
alone or in a batch. On a GPU a UNet forward at a small batch is launch-bound: a batch of
several images costs little more than one.

One worker per replica makes the batches, one at a time (the pipeline runs one call at a time
anyway). The batch of the key whose oldest request came first is made when it holds `max_size`
requests, or once that request has waited `wait_s`; while a batch is being made, the next one
gathers, so under load batches fill without waiting at all.

Each request keeps what is its own:
  - its step progress: every step of the batch is told to each request still waiting;
  - its errors: a batch that fails is made again one request at a time, so only the request
    that caused the failure gets it;
  - its caller: a request whose caller goes away (a cancelled job, a client gone) drops out of
    its batch; the others go on, and a batch left with nobody stops at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Generic, Hashable, Optional, Sequence, TypeVar

from consistory.progress import ProgressCallback, StepProgress

from .progress_stream import StoppedByCaller

logger = logging.getLogger("ray.serve")
I = TypeVar("I")  # what one request asks for
R = TypeVar("R")  # what it gets back

# make(key, items, on_step): one result per item, in order; on_step is called after each step.
MakeBatch = Callable[[Hashable, list, ProgressCallback], Awaitable[Sequence]]


@dataclass(eq=False)
class _Waiting(Generic[I]):
    item: I
    on_step: Optional[ProgressCallback]
    result: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    # Set on the event loop when the caller's wait ends; read on the pipeline's thread.
    gone: threading.Event = field(default_factory=threading.Event)
    deaf: bool = False  # its listener failed: no more steps for it, but it still gets its result

    def tell(self, progress: StepProgress) -> None:
        if self.on_step is None or self.deaf or self.gone.is_set():
            return
        try:
            self.on_step(progress)
        except StoppedByCaller:  # its caller went: it drops out of the batch
            self.gone.set()
        except Exception:
            logger.exception("a request's progress listener failed; it gets no more steps")
            self.deaf = True


class Batcher(Generic[I, R]):
    def __init__(self, make: MakeBatch, max_size: int, wait_s: float) -> None:
        self._make = make
        self.max_size = max(1, max_size)
        self.wait_s = wait_s
        self._pending: dict[Hashable, list[_Waiting[I]]] = {}
        self._arrived: Optional[asyncio.Event] = None
        self._worker: Optional[asyncio.Task] = None

    async def submit(self, key: Hashable, item: I, on_step: Optional[ProgressCallback] = None) -> R:
        """`item`'s result, made in a batch with other requests of `key`. A caller cancelled
        while it waits drops out of the batch; the others are unaffected."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(item, on_step, loop.create_future())
        waiting.result.add_done_callback(lambda _: waiting.gone.set())
        self._pending.setdefault(key, []).append(waiting)
        if self._arrived is None:
            self._arrived = asyncio.Event()
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._work())
        return await waiting.result

    async def _work(self) -> None:
        try:
            while True:
                key = await self._oldest_key()
                batch = await self._gather(key)
                if batch:
                    await self._run(key, batch)
        except BaseException as error:
            if not isinstance(error, asyncio.CancelledError):
                logger.exception("the batch worker failed; its waiting requests fail with it")
            self._fail_pending()
            raise

    def _live(self, key: Hashable) -> list[_Waiting[I]]:
        """The key's requests whose callers still wait, dropping the others."""
        live = [w for w in self._pending.get(key, []) if not w.result.done()]
        if live:
            self._pending[key] = live
        else:
            self._pending.pop(key, None)
        return live

    async def _oldest_key(self) -> Hashable:
        while True:
            for key in list(self._pending):
                self._live(key)
            if self._pending:
                return min(self._pending, key=lambda k: self._pending[k][0].arrived)
            self._arrived.clear()
            await self._arrived.wait()

    async def _gather(self, key: Hashable) -> list[_Waiting[I]]:
        """Up to `max_size` of the key's requests, once that many wait or the oldest has waited
        `wait_s`."""
        while True:
            live = self._live(key)
            if not live:
                return []
            left = live[0].arrived + self.wait_s - time.monotonic()
            if len(live) >= self.max_size or left <= 0:
                batch, rest = live[: self.max_size], live[self.max_size:]
                if rest:
                    self._pending[key] = rest
                else:
                    self._pending.pop(key, None)
                return batch
            self._arrived.clear()
            try:
                async with asyncio.timeout(left):  # not wait_for: see flow/job_queue.py
                    await self._arrived.wait()
            except TimeoutError:
                pass

    async def _run(self, key: Hashable, batch: list[_Waiting[I]]) -> None:
        try:
            results = list(await self._make(key, [w.item for w in batch], _told_to(batch)))
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} requests made {len(results)} results")
        except asyncio.CancelledError as error:
            # The worker itself is cancelled (the replica is stopping): nobody would resolve
            # these requests' futures after it, so they fail now rather than wait for ever.
            _fail(batch, RuntimeError("the replica stopped while making this request"))
            raise
        except Exception as error:
            if len(batch) == 1 or isinstance(error, StoppedByCaller):
                _fail(batch, error)
                return
            # Whose input broke the batch is not known: each request is made alone, and gets
            # its own image or its own error.
            logger.warning("a batch of %d failed (%r); making its requests one at a time", len(batch), error)
            for waiting in batch:
                if not waiting.result.done():
                    await self._run(key, [waiting])
            return
        for waiting, result in zip(batch, results):
            if not waiting.result.done():
                waiting.result.set_result(result)


    def _fail_pending(self) -> None:
        for waiting in [w for key in list(self._pending) for w in self._pending.pop(key)]:
            if not waiting.result.done():
                waiting.result.set_exception(RuntimeError("the replica stopped before making this request"))


def _told_to(batch: list[_Waiting]) -> ProgressCallback:
    """The batch's progress callback (on the pipeline's thread): each step to every request
    still waiting; once none is, the batch stops."""

    def on_step(progress: StepProgress) -> None:
        live = [w for w in batch if not w.gone.is_set()]
        if not live:
            raise StoppedByCaller("every caller of the batch stopped listening")
        for waiting in live:
            waiting.tell(progress)

    return on_step


def _fail(batch: list[_Waiting], error: BaseException) -> None:
    for waiting in batch:
        if not waiting.result.done():
            waiting.result.set_exception(error)
