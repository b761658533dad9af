"""The Generator's request batcher on its own (deployments/replicas/batching.py), with a plain
coroutine making the batches: what each request keeps when the batch around it goes wrong."""

from __future__ import annotations

import asyncio

import pytest

from deployments.replicas.batching import Batcher
from deployments.replicas.progress_stream import with_progress


async def doubled(key, items, on_step):
    for step in range(3):
        on_step(step)
        await asyncio.sleep(0.02)
    return [2 * item for item in items]


def test_a_request_whose_listener_fails_still_gets_its_result_and_the_others_their_steps():
    def broken(step):
        raise ValueError("the listener's own failure")

    async def scenario():
        heard, sizes = [], []

        async def make(key, items, on_step):
            sizes.append(len(items))
            return await doubled(key, items, on_step)

        batcher = Batcher(make, 8, 0.05)
        together = await asyncio.gather(batcher.submit("cat", 1, broken), batcher.submit("cat", 2, heard.append))
        alone = await batcher.submit("cat", 3, broken)  # not taken for a caller that left
        return [*together, alone], heard, sizes

    results, heard, sizes = asyncio.run(scenario())
    assert results == [2, 4, 6] and heard == [0, 1, 2] and sizes == [2, 1]


def test_requests_fail_rather_than_hang_when_the_batch_worker_stops_and_it_starts_again():
    async def scenario():
        batcher = Batcher(doubled, 8, 0.05)
        making = asyncio.ensure_future(batcher.submit("cat", 3))
        waiting = asyncio.ensure_future(batcher.submit("dog", 4))  # another key: waits its turn
        await asyncio.sleep(0.09)  # the cat's batch is being made
        batcher._worker.cancel()  # what stopping the replica does to it
        stopped = await asyncio.wait_for(asyncio.gather(making, waiting, return_exceptions=True), 5)
        return stopped, await asyncio.wait_for(batcher.submit("cat", 5), 5)

    stopped, again = asyncio.run(scenario())
    assert [type(e) for e in stopped] == [RuntimeError, RuntimeError]
    assert "stopped while making" in str(stopped[0]) and "stopped before making" in str(stopped[1])
    assert again == 10


def test_a_stream_left_mid_wait_leaves_no_task_behind():
    async def work(on_step):
        await asyncio.sleep(3600)

    async def scenario():
        stream = with_progress(work)
        reading = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.05)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        await stream.aclose()
        await asyncio.sleep(0)
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert asyncio.run(scenario()) == []
