"""Job event streams of one Ingress replica: one reader per job, its events fanned out to every
stream that follows the job, and a bounded number of streams.

A stream used to read the store itself every half second through the default thread pool, which
every route and /readyz share: a few dozen streams kept that pool busy, and each stream held a
slot of the replica's max_ongoing_requests, so 32 of them stalled every route. Here:

- a job's events are read once per poll however many streams follow it (`JobFeed`), on an
  executor of the hub's own, so streams take no thread another route waits for;
- a replica holds at most `max_streams` streams, and one API key at most `max_per_key`: past
  either the stream is refused with 429, before it holds anything. The settings keep
  `max_streams` at most half of the requests a replica admits (resources.py).

A feed keeps the events it has read while any stream follows its job, so a stream that joins
with `Last-Event-ID` is served from memory; the last stream to leave stops its reader.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
from typing import Any, AsyncIterator, Optional

from ..artifact_store import ArtifactStore
from ..errors import ServiceError
from ..flow.jobs import FINISHED, UnknownJob, events_after, load_job

logger = logging.getLogger("ray.serve")
POLL_S = 0.5  # how often a followed job's events are looked for
KEEP_ALIVE_S = 15.0  # proxies close connections idle for longer
# Retry-After of a stream refused for the bound: a stream is held as long as its job runs, so
# places come back slowly, and a client that polls GET /v1/jobs/{id} meanwhile misses nothing.
STREAM_RETRY_S = 15.0
READ_THREADS = 2  # the hub's store readers: one job's poll at a time each


class JobFeed:
    """The events of one job read so far, and whether there will be more."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.events: list[dict[str, Any]] = []
        self.ended = False
        self.streams = 0
        self.reader: Optional[asyncio.Task] = None
        self._changed = asyncio.Event()

    def publish(self, events: list[dict[str, Any]], ended: bool) -> None:
        if not events and not ended:
            return
        self.events.extend(events)
        self.ended = self.ended or ended
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def changed(self, timeout_s: float) -> bool:
        """Waits until new events (or the end) are published; False after `timeout_s` without."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()
            return True
        except TimeoutError:
            return False


class EventStream:
    """One client's stream of one job's events: SSE text, from after `last` to the job's end."""

    def __init__(self, hub: "EventHub", feed: JobFeed, key: Optional[str], last: int) -> None:
        self.hub, self.feed, self.key, self.last = hub, feed, key, last
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[str]:
        position = 0
        while True:
            while position < len(self.feed.events):
                event = self.feed.events[position]
                position += 1
                if event["id"] > self.last:
                    self.last = event["id"]
                    yield f"id: {event['id']}\nevent: {event['event']}\ndata: {json.dumps(event['data'])}\n\n"
            if self.feed.ended:
                return
            if not await self.feed.changed(KEEP_ALIVE_S):
                yield ": keep-alive\n\n"

    def close(self) -> None:
        """Gives its place back; idempotent."""
        if not self._closed:
            self._closed = True
            self.hub._release(self)


class EventHub:
    def __init__(self, store: ArtifactStore, max_streams: int, max_per_key: int,
                 retry_after_s: float = STREAM_RETRY_S) -> None:
        self.store = store
        self.max_streams, self.max_per_key, self.retry_after_s = max_streams, max_per_key, retry_after_s
        self._feeds: dict[str, JobFeed] = {}
        self._per_key: collections.Counter[str] = collections.Counter()
        self._streams = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="job-events")

    @property
    def streams(self) -> int:
        return self._streams

    def open(self, job_id: str, key: Optional[str], last: int) -> EventStream:
        """A stream of the job's events after `last`, or 429 if this replica or this key holds
        all the streams it may. `key`: the API key's name (None with auth off: no per-key bound)."""
        if self._streams >= self.max_streams:
            raise ServiceError(429, f"this Ingress replica already holds its {self.max_streams} event streams; "
                               "retry after Retry-After, or poll GET /v1/jobs/{id}", retry_after_s=self.retry_after_s)
        if key is not None and self._per_key[key] >= self.max_per_key:
            raise ServiceError(429, f"API key {key!r} already holds its {self.max_per_key} event streams; close one, "
                               "or poll GET /v1/jobs/{id}", retry_after_s=self.retry_after_s)
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = self._feeds[job_id] = JobFeed(job_id)
            feed.reader = asyncio.ensure_future(self._read_forever(feed))
        feed.streams += 1
        self._streams += 1
        if key is not None:
            self._per_key[key] += 1
        return EventStream(self, feed, key, last)

    def _release(self, stream: EventStream) -> None:
        self._streams -= 1
        if stream.key is not None:
            self._per_key[stream.key] -= 1
            if self._per_key[stream.key] <= 0:
                del self._per_key[stream.key]
        feed = stream.feed
        feed.streams -= 1
        if feed.streams <= 0:
            if feed.reader is not None:
                feed.reader.cancel()
            if self._feeds.get(feed.job_id) is feed:
                del self._feeds[feed.job_id]

    async def _read_forever(self, feed: JobFeed) -> None:
        loop = asyncio.get_running_loop()
        last = -1
        while not feed.ended:
            try:
                events, ended = await loop.run_in_executor(self._executor, self._read, feed.job_id, last)
            except asyncio.CancelledError:
                raise
            except Exception:  # the store failed for a moment: the streams wait, with keep-alives
                logger.exception("reading the events of job %s failed; retrying", feed.job_id)
                events, ended = [], False
            if events:
                last = events[-1]["id"]
            feed.publish(events, ended)
            if not ended:
                await asyncio.sleep(POLL_S)

    def _read(self, job_id: str, last: int) -> tuple[list[dict[str, Any]], bool]:
        """The job's events after `last`, and whether the job has ended (its final status read,
        or it is gone)."""
        events = events_after(self.store, job_id, last)
        if any(e["event"] == "status" and e["data"].get("status") in FINISHED for e in events):
            return events, True
        if not events:
            try:
                job = load_job(self.store, job_id)
            except UnknownJob:
                return [], True
            return [], job.finished and last >= job.events - 1
        return events, False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
