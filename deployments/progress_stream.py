"""Step progress from a model replica to its caller, over a Serve streaming call.

A replica method that streams yields `{"pass", "step", "steps", "done", "total"}` dicts as the
pipeline finishes each denoising step, then its result. When the caller stops listening (a job
cancelled, a client gone), Serve cancels the stream; the pipeline then stops at its next step
instead of running to the end for nobody.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator, Awaitable, Callable


class StoppedByCaller(Exception):
    """Raised inside the pipeline's progress callback once the caller has gone."""


def as_event(progress) -> dict[str, Any]:
    return {"pass": progress.pass_index, "step": progress.step, "steps": progress.steps,
            "done": progress.done, "total": progress.total}


async def with_progress(work: Callable[[Callable], Awaitable[Any]]) -> AsyncIterator[Any]:
    """Runs `work(on_step)` and yields progress events, then its result."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()

    def on_step(progress) -> None:  # on the pipeline's thread
        if gone.is_set():
            raise StoppedByCaller("the caller stopped listening")
        loop.call_soon_threadsafe(queue.put_nowait, as_event(progress))

    task = asyncio.ensure_future(work(on_step))
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
        if not task.done():
            task.cancel()
