"""Where a client gets a stored image: a URL, or the PNG itself in base64.

With the local store the URL is a route of this service (`/v1/artifacts/<key>`), signed and
expiring (signed_urls.py) and built on the configured public base URL; with S3 it is presigned
by the bucket. Every Ingress replica signs with one key, so a URL made by one opens on another.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from typing import Any, Optional

from ..artifact_store import ArtifactStore, LocalArtifactStore
from ..images import to_b64
from ..settings import ServiceSettings
from .plans import MadeImage
from .signed_urls import check_signature, signed_url

ARTIFACTS = "/v1/artifacts"
SIGNING_KEY = "service/url-signing-key"  # in the local store, readable by this service only


class ImageLinks:
    def __init__(self, store: ArtifactStore, settings: ServiceSettings) -> None:
        self.store = store
        self.base_url = settings.public_base_url
        self.expires_s = settings.url_expires_s
        key = os.environ.get("CONSISTORY_URL_SIGNING_KEY") or settings.url_signing_key
        self._signing_key = key.encode() if key else self._shared_signing_key()

    def _shared_signing_key(self) -> bytes:
        """One key for every Ingress replica, made by the first to start: a URL signed by one
        replica must open on any other behind the same load balancer."""
        if not isinstance(self.store, LocalArtifactStore):
            return secrets.token_hex(32).encode()  # unused: S3 presigns its own URLs
        if self.store.create_exclusive(SIGNING_KEY, secrets.token_hex(32).encode(), "text/plain"):
            os.chmod(self.store.path(SIGNING_KEY), 0o600)
        return self.store.get(SIGNING_KEY)

    async def url(self, key: str) -> str:
        if isinstance(self.store, LocalArtifactStore):
            return signed_url(self._signing_key, self.base_url, ARTIFACTS, key, self.expires_s)
        # Presigning can refresh credentials over the network: keep it off the event loop.
        return await asyncio.to_thread(self.store.url, key, self.expires_s)

    def check(self, key: str, expires: Optional[str], signature: Optional[str]) -> Optional[str]:
        """None if a URL of this service for `key` is valid now, else why not."""
        return check_signature(self._signing_key, key, expires, signature)

    async def public(self, image: MadeImage, response_format: str) -> dict[str, Any]:
        """What a client is told of an image: index, prompt, seed, and its URL or base64 PNG."""
        out: dict[str, Any] = {"index": image.index, "prompt": image.prompt, "seed": image.seed}
        if response_format == "b64_json":
            png = image.png if image.png is not None else await asyncio.to_thread(self.store.get, image.key)
            out["b64_json"] = to_b64(png)
        else:
            out["url"] = await self.url(image.key)
        return out
