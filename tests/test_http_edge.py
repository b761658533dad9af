"""The HTTP edge (request ids, body limits, JSON depth, the service's deadline) and signed image
URLs, on a small FastAPI app over Starlette's test client: no Ray needed."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from deployments.edge.bodies import json_problem, too_deep
from deployments.edge.http_edge import EdgeLimits, HttpEdge
from deployments.flow.signed_urls import check_signature, signed_url
from deployments.request_ids import RequestIdLogFilter, current_request_id

SECRET = b"k" * 32


def _app(limits: EdgeLimits) -> tuple[FastAPI, list[str]]:
    app = FastAPI()
    app.add_middleware(HttpEdge, limit=limits)
    handled: list[str] = []

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        handled.append(current_request_id())
        return {"size": len(await request.body()), "request_id": current_request_id()}

    @app.get("/slow")
    async def slow() -> dict:
        await asyncio.sleep(5)
        return {}

    return app, handled


@pytest.fixture
def limits() -> EdgeLimits:
    return EdgeLimits(max_bytes=1024, deadline_s=0.5, retry_after_s=3)


@pytest.fixture
def client(limits: EdgeLimits):
    app, handled = _app(limits)
    with TestClient(app) as test_client:
        test_client.handled = handled
        yield test_client


def test_a_request_without_an_id_gets_one_returned_once(client) -> None:
    response = client.post("/echo", json={})
    ids = response.headers.get_list("x-request-id")
    assert len(ids) == 1 and re.fullmatch(r"[0-9a-f]{32}", ids[0])
    assert response.json()["request_id"] == ids[0]


def test_a_proxy_given_id_is_adopted_not_repeated_and_made_safe_for_logs(client) -> None:
    response = client.post("/echo", json={}, headers={"x-request-id": "lb-42"})
    assert response.json()["request_id"] == "lb-42"
    assert response.headers.get_list("x-request-id") == []  # the proxy that set it returns it
    forged = client.post("/echo", json={}, headers={"x-request-id": "x\r INFO fake line" + "y" * 300})
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", forged.json()["request_id"])


def test_log_records_carry_the_request_id(client, caplog) -> None:
    logger = logging.getLogger("edge-test")
    logger.addFilter(RequestIdLogFilter())

    @client.app.get("/logs")
    async def logs() -> dict:
        logger.warning("inside")
        return {}

    with caplog.at_level(logging.WARNING, logger="edge-test"):
        client.get("/logs", headers={"x-request-id": "abc"})
    assert [r.request_id for r in caplog.records if r.name == "edge-test"] == ["abc"]


def test_a_declared_oversized_body_is_413_before_the_app_sees_it(client) -> None:
    response = client.post("/echo", content=b"x" * 2048, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "1024 bytes" in response.json()["detail"]
    assert client.handled == []


def test_an_undeclared_oversized_body_is_413_too(client) -> None:
    def chunks():
        for _ in range(8):
            yield b"x" * 256

    response = client.post("/echo", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and client.handled == []


def test_a_body_within_the_limit_reaches_the_app_intact(client) -> None:
    response = client.post("/echo", content=b'{"a": "' + b"z" * 900 + b'"}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 200 and response.json()["size"] == 909


@pytest.mark.parametrize("body, words", [
    ('{"p": "caf\xe9"}'.encode("latin-1"), "not UTF-8 (byte 10)"),
    (b"[" * 40 + b"]" * 40, "nests deeper than 32"),
])
def test_json_that_would_break_the_parser_is_a_422_with_a_reason(client, body, words) -> None:
    response = client.post("/echo", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and words in response.json()["detail"]
    assert client.handled == []


def test_json_depth_ignores_brackets_inside_strings() -> None:
    assert not too_deep(b'{"a": "' + b"[[[[" * 50 + b'"}', 32)
    assert not too_deep(b'{"a": "\\"[[[[' + b"[" * 50 + b'"}', 32)
    assert too_deep(b'{"a": ' + b"[" * 33 + b"]" * 33 + b"}", 32)
    assert not too_deep(b'{"a": ' + b"[" * 31 + b"]" * 31 + b"}", 32)


def test_the_json_check_is_linear_in_the_body_whatever_its_strings_hold() -> None:
    # A quote and then escaped quotes, unterminated: each escaped quote could begin a string
    # that runs to the end (quadratic: 64 KB took 14 s, with the replica's event loop held).
    for body in [b'"' + b'\\"' * 100_000, b'{"a": "' + b'\\"' * 100_000 + b'"}', b'"\\' * 100_000]:
        started = time.monotonic()
        json_problem(body)
        assert time.monotonic() - started < 1.0
    assert json_problem(b'{"a": "' + b'\\"' * 1000 + b'[' * 40 + b'"}') is None  # brackets inside a string


def test_a_request_past_the_deadline_is_503_with_retry_after(client) -> None:
    response = client.get("/slow")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "3" and "0.5 s" in response.json()["detail"]


# --- signed image URLs ---
KEY = "subjects/0123/images/0000000000000-00000000/000.png"


def _query(url: str) -> tuple[str, str]:
    expires = re.search(r"expires=(\d+)", url).group(1)
    return expires, re.search(r"signature=([0-9a-f]+)", url).group(1)


def test_a_signed_url_opens_until_it_expires() -> None:
    url = signed_url(SECRET, "https://img.example/", "/v1/artifacts", KEY, 60, now=1000.0)
    assert url.startswith("https://img.example/v1/artifacts/" + KEY + "?")
    expires, sig = _query(url)
    assert check_signature(SECRET, KEY, expires, sig, now=1059.0) is None
    assert "expired" in check_signature(SECRET, KEY, expires, sig, now=1061.0)


def test_a_signed_url_cannot_be_moved_stretched_or_forged() -> None:
    expires, sig = _query(signed_url(SECRET, None, "/v1/artifacts", KEY, 60, now=1000.0))
    other_key = KEY.replace("000.png", "001.png")
    assert "does not match" in check_signature(SECRET, other_key, expires, sig, now=1000.0)
    assert "does not match" in check_signature(SECRET, KEY, str(int(expires) + 3600), sig, now=1000.0)
    assert "does not match" in check_signature(b"other" * 8, KEY, expires, sig, now=1000.0)
    # Another script's digits pass str.isdigit() but not int(); 5000 digits pass neither int()
    # nor any expiry this service writes; hmac.compare_digest raises on non-ASCII text: each is
    # no signature, never an error.
    for missing in [(None, sig), (expires, None), ("soon", sig), ("\u00b2", sig), ("9" * 5000, sig), (" 2000", sig),
                    (expires, "\u00e9"), (expires, sig.upper()), (expires, sig[:-1])]:
        assert "no valid signature" in check_signature(SECRET, KEY, *missing, now=1000.0)
