"""A storm of hostile clients for the soak test, in a process of its own (so that its event loop
and the test's own clients and probes do not share one interpreter): held event streams, bodies
sent a byte at a time with and without a key, and oversized headers, for `seconds`."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass

from hostile_clients import HeldStream, request, slow_body


@dataclass(frozen=True)
class Storm:
    base_url: str
    tokens: dict[str, str]  # hostile key name -> token
    jobs: dict[str, str]  # hostile key name -> its running job
    seconds: float
    streams: int = 200
    slow_bodies: int = 32
    header_bytes: tuple[int, ...] = (64 * 2**10, 2**20)


def run(storm: Storm, results) -> None:
    """Process entry point: puts a summary dict on `results` when the storm is over."""
    results.put(asyncio.run(_storm(storm)))


async def _storm(storm: Storm) -> dict:
    counts: collections.Counter[str] = collections.Counter()
    held: set[int] = set()
    most_held = 0
    end = time.monotonic() + storm.seconds
    keys = sorted(storm.tokens)

    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {storm.tokens[key]}"}

    async def stream_client(i: int) -> None:
        nonlocal most_held
        key = keys[i % len(keys)]
        while time.monotonic() < end:
            stream = await HeldStream.open(storm.base_url, f"/v1/jobs/{storm.jobs[key]}/events", auth(key))
            counts[f"stream {stream.answer.status}"] += 1
            if stream.answer.status == 503:
                counts[f"stream 503: {stream.answer.body[:40].decode(errors='replace')}"] += 1
            if stream.answer.status == 200:
                held.add(i)
                most_held = max(most_held, len(held))
                while time.monotonic() < end and not stream.reader.at_eof():
                    try:  # read what comes (keep-alives), as a client that holds a stream does
                        await asyncio.wait_for(stream.reader.read(4096), timeout=1.0)
                    except TimeoutError:
                        pass
                held.discard(i)
                stream.close()
                continue
            stream.close()
            wait = float(stream.answer.headers.get("retry-after", 1))
            await asyncio.sleep(min(wait, max(0.0, end - time.monotonic())))

    async def slow_client(i: int) -> None:
        keyed = i % 2 == 1
        headers = auth(keys[i % len(keys)]) if keyed else {}
        while time.monotonic() < end:
            answer = await slow_body(storm.base_url, "/v1/subjects", headers, 4000, 1.0,
                                     give_up_s=max(1.0, end - time.monotonic()))
            counts[f"slow body {'with' if keyed else 'without'} a key {answer.status}"] += 1
            if answer.seconds < 0.5:  # turned away at once: come back a moment later, as a bot would
                await asyncio.sleep(0.5)

    async def header_client() -> None:
        while time.monotonic() < end:
            for size in storm.header_bytes:
                answer = await request(storm.base_url, "GET", "/healthz", {"X-Padding": "x" * size}, timeout_s=30)
                counts[f"header of {size} bytes {answer.status}"] += 1
            await asyncio.sleep(0.5)

    tasks = [stream_client(i) for i in range(storm.streams)] + [slow_client(i) for i in range(storm.slow_bodies)]
    await asyncio.gather(*tasks, header_client())
    return {"counts": dict(counts), "most_held": most_held}
