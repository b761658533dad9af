"""What operators and browsers use: the probes, the API's docs and the storyboard page."""

from __future__ import annotations

import html
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

from ..responses import documented
from ..schemas import HealthOut, ReadyOut
from ..services import Services, services

STATIC = Path(__file__).resolve().parents[1] / "static"
router = APIRouter()


@router.get("/healthz", response_model=HealthOut)
async def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get("/readyz", response_model=ReadyOut, responses=documented(503))
async def readyz(svc: Services = Depends(services)) -> ReadyOut:
    """Ready while both model deployments have a running replica (asked of Serve's controller,
    not through their request queues, and cached for `ready_cache_s`)."""
    return await svc.readiness.check(svc.settings.model_id, svc.settings.retry_after_s)


@router.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    """Swagger UI from this package's own files: it works on clusters with no way out to a CDN."""
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title="ConsiStory API",
        swagger_js_url=f"{root}/static/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/static/swagger-ui/swagger-ui.css",
        swagger_favicon_url=f"{root}/static/swagger-ui/favicon-32x32.png",
        oauth2_redirect_url=None,
    )


@router.get("/", include_in_schema=False)
async def storyboard(request: Request, svc: Services = Depends(services)) -> HTMLResponse:
    """The page, with its base URL (so its relative paths work under any route prefix) and
    whether it must ask for an API key before its first call (a 401 there would be a console
    error on every visit)."""
    root = request.scope.get("root_path", "").rstrip("/")
    page = (STATIC / "storyboard" / "index.html").read_text(encoding="utf-8")
    auth = "required" if svc.access.enabled else "off"
    return HTMLResponse(page.replace("{{base}}", html.escape(root + "/")).replace("{{auth}}", auth))
