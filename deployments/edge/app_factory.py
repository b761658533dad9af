"""The Ingress's FastAPI application, built anew for each replica from its services.

- `HttpEdge` (request ids, header, admission and body limits, the key checked before a body is
  read, the service's own deadline) around everything, with the limits of this replica's
  settings; `RequestMetrics` outside it, counting its answers too; `AllowedMethods` inside it
  (OPTIONS and 405 list every method of a path);
- error bodies are always `{"detail": "<one sentence>"}`, as the OpenAPI schema says: the
  service's own errors (`ServiceError`, raised anywhere below the routes) with their status and
  headers, validation problems in one sentence per field (422), the artifact store's failures as
  503 with Retry-After and a generic detail, anything unexpected as 500 with the request id only;
- the routers of routes/, which reach the replica's services through `app.state.services`;
- `/static`: Swagger UI's files (so `/docs` works on clusters with no way out to a CDN) and the
  storyboard page's.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from ..artifact_store import ArtifactStoreError
from ..errors import ServiceError, store_unavailable
from ..metrics import RequestMetrics
from ..request_ids import RequestIdLogFilter, current_request_id
from .http_edge import EdgeLimits, HttpEdge
from .methods import AllowedMethods, takes_body
from .responses import documented
from .routes import ROUTERS, operations
from .services import Services

logger = logging.getLogger("ray.serve")
logger.addFilter(RequestIdLogFilter())
STATIC = Path(__file__).parent / "static"


def build_asgi_app(services: Services) -> FastAPI:
    settings = services.settings
    app = FastAPI(
        title="ConsiStory",
        version="1",
        description="Training-free consistent-subject image generation (ConsiStory on SDXL).",
        docs_url=None,  # routes/operations.py serves it, with local assets
        redoc_url=None,
        lifespan=lambda _: services.running(),
    )
    app.state.services = services
    edge = settings.edge
    limits = EdgeLimits(max_bytes=settings.body_limit, deadline_s=settings.request_deadline_s,
                        retry_after_s=settings.retry_after_s, max_header_bytes=edge.max_header_bytes,
                        body_allowance_s=edge.body_allowance_s, min_body_bytes_per_s=edge.min_body_bytes_per_s,
                        max_requests=edge.admitted(settings.ingress))
    app.add_middleware(AllowedMethods, router=app.router)
    app.add_middleware(HttpEdge, limit=limits, gate=services.access.gate, takes_body=partial(takes_body, app.router))
    app.add_middleware(RequestMetrics)  # outermost: counts the edge's own answers (413, 503) too
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for router in ROUTERS:
        # The edge's own answers, on every route: 431 for large headers, and past the probes, 503
        # when the replica holds all the requests it admits.
        app.include_router(router, responses=documented(431) if router is operations else documented(431, 503))

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
        return _answer(error)

    @app.exception_handler(RequestValidationError)
    async def _readable_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": validation_detail(error)})

    @app.exception_handler(ArtifactStoreError)
    async def _store_failed(request: Request, error: ArtifactStoreError) -> JSONResponse:
        logger.error("artifact store failed [request %s]: %s", current_request_id(), error)
        return _answer(store_unavailable(settings.retry_after_s))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        request_id = current_request_id(request.scope)
        logger.exception("unexpected error [request %s]", request_id)
        return JSONResponse(status_code=500, content={"detail": f"internal error; report request id {request_id}"})

    return app


def _answer(error: ServiceError) -> JSONResponse:
    return JSONResponse(status_code=error.status_code, content={"detail": error.detail}, headers=error.headers)


def validation_detail(error: RequestValidationError) -> str:
    """One sentence per problem, naming the field, instead of FastAPI's nested error list."""
    problems = []
    for item in error.errors():
        loc = [str(part) for part in item.get("loc", ()) if part != "body"]
        if item.get("type") == "json_invalid":
            problems.append(
                "the request body is not valid JSON "
                f"({item.get('ctx', {}).get('error', 'decode error')}); send a JSON object "
                "with Content-Type: application/json"
            )
        elif item.get("type") == "model_attributes_type" or (not loc and item.get("type") == "dict_type"):
            problems.append(
                "the request body must be a JSON object sent with Content-Type: application/json, "
                "e.g. {\"prompts\": [...], \"subjects\": [...]}"
            )
        else:
            where = ".".join(loc) if loc else "body"
            problems.append(f"{where}: {item.get('msg')}")
    return "; ".join(problems)
