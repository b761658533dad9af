"""Clients that misbehave on purpose, on raw asyncio sockets (an HTTP library sends a body at
once and holds no stream open without reading it): held event streams, bodies sent a byte at a
time, oversized headers; and what the service suites write into its store to stand for a job
that runs for as long as a test needs."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from deployments.artifact_store import LocalArtifactStore
from deployments.flow.jobs import JobRecord, append_event, new_job_id, save_job


def running_job(store_root: Path, owner: str) -> str:
    """A job of `owner` that stays running: its record and first event, as a runner on another
    replica would have written them, and no mark that lets a replica here take it over."""
    store = LocalArtifactStore(str(store_root))
    now = time.time()
    job = JobRecord(job_id=new_job_id(), kind="images", owner=owner, request_id=f"{int(now * 1000):013d}-0000abcd",
                    status="running", created_at=now, updated_at=now, images_total=1)
    append_event(store, job, "status", {"status": "running"})
    save_job(store, job)
    return job.job_id


@dataclass
class Answer:
    status: int  # 0: no answer (the connection closed or the wait ran out)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0


def _address(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    return parts.hostname, parts.port


def _head(method: str, base_url: str, path: str, headers: dict[str, str]) -> bytes:
    host, port = _address(base_url)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _read_answer(reader: asyncio.StreamReader, read_body: bool = True) -> Answer:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return Answer(0)
    first, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
    answer = Answer(int(first.split()[1]), headers)
    if read_body and "content-length" in headers:
        answer.body = await reader.readexactly(int(headers["content-length"]))
    return answer


async def request(base_url: str, method: str, path: str, headers: dict[str, str] | None = None,
                  body: bytes = b"", timeout_s: float = 30.0) -> Answer:
    """One request on its own connection, sent whole."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(*_address(base_url))
    try:
        sent = dict(headers or {}, **({"Content-Length": str(len(body))} if body or method == "POST" else {}))
        writer.write(_head(method, base_url, path, sent) + body)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            answer = await _read_answer(reader)
    except (TimeoutError, ConnectionError):
        answer = Answer(0)
    finally:
        writer.close()
    answer.seconds = time.monotonic() - started
    return answer


class HeldStream:
    """An event stream opened and then held: its events are read only as the socket buffers fill."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: Answer) -> None:
        self.reader, self.writer, self.answer = reader, writer, answer

    @classmethod
    async def open(cls, base_url: str, path: str, headers: dict[str, str], timeout_s: float = 30.0) -> "HeldStream":
        reader, writer = await asyncio.open_connection(*_address(base_url))
        writer.write(_head("GET", base_url, path, headers))
        await writer.drain()
        try:
            async with asyncio.timeout(timeout_s):
                answer = await _read_answer(reader, read_body=False)
        except TimeoutError:
            answer = Answer(0)
        if answer.status != 200 and "content-length" in answer.headers:
            answer.body = await reader.readexactly(int(answer.headers["content-length"]))
        return cls(reader, writer, answer)

    async def first_bytes(self, timeout_s: float = 10.0) -> bytes:
        async with asyncio.timeout(timeout_s):
            return await self.reader.read(4096)

    def close(self) -> None:
        self.writer.close()


async def slow_body(base_url: str, path: str, headers: dict[str, str], size: int, byte_every_s: float,
                    give_up_s: float) -> Answer:
    """POSTs a JSON body of `size` bytes one byte every `byte_every_s`, reading the answer all the
    while; an answer before the body is sent is what a server that reads no body yet gives."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(*_address(base_url))
    sent_headers = dict(headers, **{"Content-Type": "application/json", "Content-Length": str(size)})
    writer.write(_head("POST", base_url, path, sent_headers))
    answering = asyncio.ensure_future(_read_answer(reader))
    try:
        for _ in range(size):
            if answering.done() or time.monotonic() - started > give_up_s:
                break
            writer.write(b" ")
            await writer.drain()
            await asyncio.wait([answering], timeout=byte_every_s)
        async with asyncio.timeout(max(0.1, give_up_s - (time.monotonic() - started))):
            answer = await answering
    except (TimeoutError, ConnectionError):
        answering.cancel()
        answer = Answer(0)
    finally:
        writer.close()
    answer.seconds = time.monotonic() - started
    return answer
