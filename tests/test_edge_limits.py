"""What the edge bounds, on the edge alone (no Ray): requests in flight with the probes kept
apart, the caller checked before any body is read, a body's minimum rate, header bytes, the
methods a path allows, numbers read strictly, and the event hub's bounds and fan-out."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from pathlib import Path

import pytest
from fastapi import FastAPI
from hostile_clients import running_job

from deployments.artifact_store import LocalArtifactStore
from deployments.edge.event_hub import EventHub
from deployments.edge.http_edge import EdgeLimits, HttpEdge
from deployments.edge.methods import AllowedMethods, takes_body
from deployments.numbers import ascii_integer
from deployments.errors import ServiceError
from deployments.flow.jobs import append_event, load_job, save_job
from deployments.resources import DeploymentResources, EdgeSettings

LIMITS = EdgeLimits(max_bytes=4096, deadline_s=5, retry_after_s=2, max_header_bytes=2048, body_allowance_s=0.3,
                    min_body_bytes_per_s=1000, max_requests=2)


def _app(limits: EdgeLimits = LIMITS, gate=None) -> tuple[FastAPI, asyncio.Event, list[str]]:
    app = FastAPI()
    release, seen = asyncio.Event(), []

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/held")
    async def held() -> dict:
        await release.wait()
        return {}

    @app.post("/v1/things")
    async def things(body: dict) -> dict:
        seen.append("handled")
        return body

    @app.get("/v1/things")
    async def list_things() -> dict:
        return {}

    app.add_middleware(AllowedMethods, router=app.router)
    app.add_middleware(HttpEdge, limit=limits, gate=gate, takes_body=partial(takes_body, app.router))
    return app, release, seen


async def call(app, method: str, path: str, headers: dict[str, str] | list | None = None, chunks=(b"",),
               chunk_every_s: float = 0.0) -> tuple[int, dict[str, str], bytes]:
    """One request straight into the ASGI app, its body in `chunks` sent `chunk_every_s` apart."""
    pending = list(chunks)
    answer: dict = {"body": b""}

    async def receive() -> dict:
        if not pending:
            await asyncio.sleep(3600)
        await asyncio.sleep(chunk_every_s)
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            answer["body"] += message.get("body", b"")

    pairs = headers.items() if isinstance(headers, dict) else (headers or [])
    raw = [(k.lower().encode(), v.encode()) for k, v in pairs]
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": raw, "asgi": {"version": "3.0"}, "scheme": "http",
             "server": ("test", 80), "client": ("test", 1)}
    await app(scope, receive, send)
    return answer["status"], answer["headers"], answer["body"]


def test_past_its_requests_in_flight_a_replica_answers_503_and_the_probes_still_pass():
    async def scenario():
        app, release, _ = _app()
        held = [asyncio.ensure_future(call(app, "GET", "/held")) for _ in range(2)]
        await asyncio.sleep(0.05)
        status, headers, body = await call(app, "GET", "/held")
        assert status == 503 and headers["retry-after"] == "2" and b"its 2 requests at once" in body
        started = time.monotonic()
        assert (await call(app, "GET", "/healthz"))[0] == 200 and time.monotonic() - started < 0.1
        release.set()
        assert [s for s, _, _ in await asyncio.gather(*held)] == [200, 200]
        assert (await call(app, "GET", "/held"))[0] == 200  # the places were given back

    asyncio.run(scenario())


def test_the_gate_answers_before_any_body_is_read():
    def gate(scope) -> None:
        if not dict(scope["headers"]).get(b"authorization"):
            raise ServiceError(401, "missing key", headers={"WWW-Authenticate": "Bearer"})

    async def scenario():
        app, _, seen = _app(gate=gate)
        started = time.monotonic()
        # A body that would take an hour to arrive: the answer must not wait for it.
        status, headers, _ = await call(app, "POST", "/v1/things", chunks=[b"{"] * 3600, chunk_every_s=1.0)
        assert status == 401 and headers["www-authenticate"] == "Bearer" and headers["connection"] == "close"
        assert time.monotonic() - started < 0.5 and seen == []
        ok = await call(app, "POST", "/v1/things", {"Authorization": "Bearer x", "Content-Type": "application/json"},
                        [b'{"a": 1}'])
        assert ok[0] == 200 and seen == ["handled"]

    asyncio.run(scenario())


def test_a_body_slower_than_the_minimum_rate_is_408_and_one_at_the_rate_is_read():
    async def scenario():
        app, _, seen = _app()
        started = time.monotonic()
        status, headers, body = await call(app, "POST", "/v1/things", {"Content-Type": "application/json"},
                                           [b" "] * 100, chunk_every_s=0.1)
        assert status == 408 and b"too slowly" in body and headers["connection"] == "close"
        assert 0.3 <= time.monotonic() - started < 0.6 and seen == []
        # 400 bytes every 0.1 s is 4000 bytes/s, above the 1000 the limits ask for.
        chunks = [b'{"a": "'] + [b"x" * 400] * 8 + [b'"}']
        status, _, _ = await call(app, "POST", "/v1/things", {"Content-Type": "application/json"}, chunks, 0.1)
        assert status == 200 and seen == ["handled"]

    asyncio.run(scenario())


def test_headers_past_the_limit_are_431_even_for_the_probes():
    async def scenario():
        app, _, _ = _app()
        status, _, body = await call(app, "GET", "/healthz", {"X-Padding": "x" * 3000})
        assert status == 431 and b"at most 2048" in body
        assert (await call(app, "GET", "/healthz", {"X-Padding": "x" * 1000}))[0] == 200

    asyncio.run(scenario())


def test_options_and_405_say_every_method_of_the_path():
    async def scenario():
        app, _, _ = _app()
        status, headers, _ = await call(app, "OPTIONS", "/v1/things")
        assert status == 204 and headers["allow"] == "GET, OPTIONS, POST"
        status, headers, body = await call(app, "DELETE", "/v1/things")
        assert status == 405 and headers["allow"] == "GET, OPTIONS, POST" and b"allows GET, OPTIONS, POST" in body
        assert (await call(app, "OPTIONS", "/nowhere"))[0] == 404

    asyncio.run(scenario())


def test_a_body_is_read_only_where_a_route_takes_one():
    async def scenario():
        app, _, seen = _app()
        started = time.monotonic()
        # A body that would take an hour to arrive, sent where no route takes it: answered at
        # once, not read (nor held against the rate limit) first.
        for method, path, status in [("POST", "/nowhere", 404), ("PUT", "/v1/things", 405), ("POST", "/healthz", 405)]:
            answered = await call(app, method, path, {"Content-Type": "application/json"}, [b"["] * 3600, 1.0)
            assert answered[0] == status, (method, path, answered)
        assert time.monotonic() - started < 1.0 and seen == []

    asyncio.run(scenario())


def test_the_first_of_repeated_content_types_is_the_one_checked():
    async def scenario():
        app, _, seen = _app()
        nested = b"[" * 40 + b"]" * 40
        headers = [("Content-Type", "application/json"), ("Content-Type", "text/plain")]
        status, _, body = await call(app, "POST", "/v1/things", headers, [nested])
        assert status == 422 and b"nests deeper than 32" in body and seen == []

    asyncio.run(scenario())


@pytest.mark.parametrize("text, number", [
    ("12", 12), (b"0", 0), ("\u00b2", None), ("\u0661", None), ("+1", None), (" 1", None), ("1_0", None),
    ("-1", None), ("", None), ("9" * 19, None), ("9" * 18, 10**18 - 1), (b"\xb2", None), (None, None),
])
def test_numbers_are_ascii_digits_of_bounded_length(text, number):
    assert ascii_integer(text, max_digits=18) == number


def test_stream_bounds_leave_the_probes_and_other_routes_their_share():
    ingress = DeploymentResources(max_ongoing_requests=32)
    assert EdgeSettings().admitted(ingress) == 28 and EdgeSettings().event_streams(ingress) == 14
    with pytest.raises(ValueError, match="to the probes"):
        EdgeSettings(max_requests=30).check_fits(ingress)
    with pytest.raises(ValueError, match="at most half"):
        EdgeSettings(max_event_streams=20).check_fits(ingress)


def test_one_reader_per_job_fans_out_every_event_and_the_bounds_hold(tmp_path: Path):
    store = LocalArtifactStore(str(tmp_path))
    job_id = running_job(tmp_path, "alice")

    async def scenario():
        hub = EventHub(store, max_streams=3, max_per_key=2, retry_after_s=1)
        streams = [hub.open(job_id, "alice", -1), hub.open(job_id, "alice", 0)]
        with pytest.raises(ServiceError, match="API key 'alice' already holds its 2"):
            hub.open(job_id, "alice", -1)
        streams.append(hub.open(job_id, "bob", -1))
        with pytest.raises(ServiceError, match="already holds its 3 event streams") as refused:
            hub.open(job_id, None, -1)
        assert refused.value.status_code == 429 and refused.value.headers["Retry-After"] == "1"
        assert len(hub._feeds) == 1  # three streams, one reader

        async def ids(stream) -> list[str]:
            return [text.split("\n")[0] async for text in stream if not text.startswith(":")]

        reading = [asyncio.ensure_future(ids(s)) for s in streams]
        await asyncio.sleep(0.2)
        job = load_job(store, job_id)
        append_event(store, job, "progress", {"images_done": 0})
        job.status = "succeeded"
        append_event(store, job, "status", {"status": "succeeded"})
        save_job(store, job)
        got = await asyncio.wait_for(asyncio.gather(*reading), 10)
        assert got == [["id: 0", "id: 1", "id: 2"], ["id: 1", "id: 2"], ["id: 0", "id: 1", "id: 2"]]
        for stream in streams:
            stream.close()
            stream.close()  # twice changes nothing
        assert hub.streams == 0 and not hub._feeds
        hub.close()

    asyncio.run(scenario())
