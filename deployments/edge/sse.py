"""The HTTP answer of an event stream: Server-Sent Events from an `EventStream`, whose place in
the hub is given back however the answer ends (the job's end, the client leaving, the deadline)."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.responses import Response

from .event_hub import EventStream

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer the stream


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, stream: EventStream) -> None:
        # No body and so no Content-Length: the events are streamed.
        self.status_code, self.background, self.stream = 200, None, stream
        self.init_headers(HEADERS)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            sending = asyncio.ensure_future(self._send_events(send))
            leaving = asyncio.ensure_future(_disconnected(receive))
            try:
                await asyncio.wait((sending, leaving), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sending, leaving):
                    task.cancel()
                await asyncio.gather(sending, leaving, return_exceptions=True)
            if not sending.cancelled() and sending.exception() is not None:
                raise sending.exception()
        finally:
            self.stream.close()

    async def _send_events(self, send: Any) -> None:
        async for text in self.stream:
            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
