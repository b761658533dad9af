"""The Ingress's FastAPI application: what wraps every route.

- `HttpEdge` (request ids, body limits, the service's own deadline) around everything;
- error bodies are always `{"detail": "<one sentence>"}`, as the OpenAPI schema says: validation
  problems in one sentence per field (422), the artifact store's failures as 503 with
  Retry-After and a generic detail, anything unexpected as 500 with the request id only;
- `/docs` is Swagger UI served from this package (`static/swagger-ui`), so it works on clusters
  with no way out to a CDN;
- `/` is the storyboard page (`static/storyboard`): plain files that call the public v1 API.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from .access import Access
from .artifact_store import ArtifactStoreError
from .http_edge import EdgeLimits, HttpEdge, RequestIdLogFilter, current_request_id
from .metrics import RequestMetrics
from .responses import store_unavailable

logger = logging.getLogger("ray.serve")
logger.addFilter(RequestIdLogFilter())
STATIC = Path(__file__).parent / "static"

app = FastAPI(
    title="ConsiStory",
    version="1",
    description="Training-free consistent-subject image generation (ConsiStory on SDXL).",
    docs_url=None,  # served below, with local assets
    redoc_url=None,
)
edge_limits = EdgeLimits()
app.state.access = Access()  # open until the Ingress configures it (deployments/access.py)
app.add_middleware(HttpEdge, limit=edge_limits)
app.add_middleware(RequestMetrics)  # outermost: counts the edge's own answers (413, 503) too
app.mount("/static", StaticFiles(directory=STATIC), name="static")


@app.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}",
        title="ConsiStory API",
        swagger_js_url=f"{root}/static/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/static/swagger-ui/swagger-ui.css",
        swagger_favicon_url=f"{root}/static/swagger-ui/favicon-32x32.png",
        oauth2_redirect_url=None,
    )


@app.get("/", include_in_schema=False)
async def storyboard(request: Request) -> HTMLResponse:
    """The page, with its base URL (so its relative paths work under any route prefix) and
    whether it must ask for an API key before its first call (a 401 there would be a console
    error on every visit)."""
    root = request.scope.get("root_path", "").rstrip("/")
    page = (STATIC / "storyboard" / "index.html").read_text(encoding="utf-8")
    auth = "required" if request.app.state.access.enabled else "off"
    return HTMLResponse(page.replace("{{base}}", html.escape(root + "/")).replace("{{auth}}", auth))


@app.exception_handler(RequestValidationError)
async def _readable_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
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
    return JSONResponse(status_code=422, content={"detail": "; ".join(problems)})


@app.exception_handler(ArtifactStoreError)
async def _store_failed(request: Request, error: ArtifactStoreError) -> JSONResponse:
    logger.error("artifact store failed [request %s]: %s", current_request_id(), error)
    answer = store_unavailable(edge_limits.retry_after_s)
    return JSONResponse(status_code=503, content={"detail": answer.detail}, headers=answer.headers)


@app.exception_handler(Exception)
async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    request_id = current_request_id(request.scope)
    logger.exception("unexpected error [request %s]", request_id)
    return JSONResponse(status_code=500, content={"detail": f"internal error; report request id {request_id}"})
