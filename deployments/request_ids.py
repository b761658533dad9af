"""The id of the HTTP request being handled, for log lines and error bodies.

The edge (`edge/http_edge.py`) sets it for each request; everything below it, the story flow
included, reads it here, so a 500 or a log line names the request without any layer knowing
about HTTP.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Optional

SCOPE_KEY = "consistory.request_id"  # where the edge also puts it in the ASGI scope

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def current_request_id(scope: Optional[dict] = None) -> str:
    """The request's id; handlers that run outside the edge's context (500s) pass the scope."""
    if scope is not None and SCOPE_KEY in scope:
        return scope[SCOPE_KEY]
    return request_id_var.get()


class RequestIdLogFilter(logging.Filter):
    """Adds `request_id` to every log record made while a request is handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True
