"""Images of the local artifact store, at the signed URLs the service hands out (S3 serves its
own presigned ones)."""

from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from ...artifact_store import LocalArtifactStore
from ...errors import ServiceError, not_found
from ...flow.image_links import ARTIFACTS
from ...flow.subjects import is_image_key, record_key
from ..responses import documented
from ..services import Services, services

NO_IMAGE = "no image at this address: it was never made, its subject was deleted, or it has expired"
router = APIRouter()


@router.get(ARTIFACTS + "/{key:path}", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}, "description": "The image."}, **documented(403, 404, 422)})
async def artifact(key: str, expires: Optional[str] = None, signature: Optional[str] = None,
                   svc: Services = Depends(services)) -> FileResponse:
    """Images of the local artifact store, at the signed URLs it hands out."""
    store = svc.store
    if not is_image_key(key) or not isinstance(store, LocalArtifactStore):
        raise not_found(NO_IMAGE)
    problem = svc.links.check(key, expires, signature)
    if problem:
        raise ServiceError(403, problem)
    try:
        path = store.path(key)
    except ValueError:
        raise not_found(NO_IMAGE) from None
    if not path.is_file() or not await asyncio.to_thread(store.exists, record_key(key.split("/")[1])):
        raise not_found(NO_IMAGE)
    return FileResponse(path, media_type="image/png")
