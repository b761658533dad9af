"""Step progress from a model replica to its caller, over a Serve streaming call.

A replica method that streams yields the library's `StepProgress` as the pipeline finishes each
denoising step, then its result (`AnchorStreamItem`, `ImageStreamItem` in messages.py). When the
caller stops listening (a job cancelled, a client gone), Serve cancels the stream; the pipeline
then stops at its next step instead of running to the end for nobody.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator, Awaitable, Callable

from consistory.progress import StepProgress


class StoppedByCaller(Exception):
    """Raised inside the pipeline's progress callback once the caller has gone."""


async def with_progress(work: Callable[[Callable], Awaitable[Any]]) -> AsyncIterator[Any]:
    """Runs `work(on_step)` and yields each step's progress, then its result."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()

    def on_step(progress: StepProgress) -> None:  # on the pipeline's thread
        if gone.is_set():
            raise StoppedByCaller("the caller stopped listening")
        loop.call_soon_threadsafe(queue.put_nowait, progress)

    task = asyncio.ensure_future(work(on_step))
    getter = None
    try:
        while not task.done() or not queue.empty():
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        yield task.result()
    finally:
        gone.set()
        if getter is not None and not getter.done():
            getter.cancel()  # the caller left mid-wait: no queue read outlives the stream
        if not task.done():
            task.cancel()
