"""Choosing and building the artifact store from settings and the environment.

Configuration (``artifact_store_from_config``): a settings mapping, e.g. from the
serve config, with the environment taking precedence over it.

=============================  ======================================================
variable                       meaning
=============================  ======================================================
``CONSISTORY_STORE``           ``local`` (default) or ``s3``
``CONSISTORY_STORE_ROOT``      local: directory to write under (default ``./artifacts``)
``CONSISTORY_S3_BUCKET``       s3: bucket name (required for ``s3``)
``CONSISTORY_S3_PREFIX``       s3: key prefix inside the bucket, e.g. ``consistory/``
``CONSISTORY_S3_ENDPOINT_URL`` s3: endpoint of an S3-compatible server (MinIO, moto, ...);
                               unset for AWS itself
``CONSISTORY_S3_REGION``       s3: region; falls back to ``AWS_REGION``, then
                               ``AWS_DEFAULT_REGION``
``CONSISTORY_S3_ADDRESSING``   s3: ``path``, ``virtual`` or ``auto``; default ``path``
                               when an endpoint URL is set, boto3's own default otherwise
=============================  ======================================================

S3 credentials come only from boto3's normal chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and config files, instance or pod roles).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .base import ArtifactStore
from .local import LocalArtifactStore
from .s3 import S3ArtifactStore

__all__ = ["artifact_store_from_config"]


# settings key -> environment variable that overrides it
_ENV = {
    "kind": "CONSISTORY_STORE",
    "root": "CONSISTORY_STORE_ROOT",
    "url_prefix": "CONSISTORY_STORE_URL_PREFIX",
    "bucket": "CONSISTORY_S3_BUCKET",
    "prefix": "CONSISTORY_S3_PREFIX",
    "endpoint_url": "CONSISTORY_S3_ENDPOINT_URL",
    "region": "CONSISTORY_S3_REGION",
    "addressing_style": "CONSISTORY_S3_ADDRESSING",
}


def artifact_store_from_config(settings: Mapping[str, Any] | None = None) -> ArtifactStore:
    """Build the store from ``settings`` (keys as in ``_ENV``), environment first.

    With nothing configured: a local store under ``./artifacts`` (absolute).
    """
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(_ENV))
    if unknown:
        raise ValueError(f"unknown artifact store setting(s) {unknown}; known: {sorted(_ENV)}")

    def setting(name: str) -> Any:
        value = os.environ.get(_ENV[name])
        if value is not None and value.strip():
            return value.strip()
        value = settings.get(name)
        return value if value not in (None, "") else None

    kind = str(setting("kind") or "local").lower()
    if kind == "local":
        root = Path(setting("root") or "artifacts").expanduser().resolve()
        url_prefix = setting("url_prefix")
        return LocalArtifactStore(root, url_prefix) if url_prefix else LocalArtifactStore(root)
    if kind == "s3":
        bucket = setting("bucket")
        if not bucket:
            raise ValueError(
                "artifact store kind 's3' needs a bucket: set CONSISTORY_S3_BUCKET "
                "(or 'bucket' in the artifact store settings)"
            )
        region = (
            setting("region")
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or None
        )
        return S3ArtifactStore(
            bucket=str(bucket),
            prefix=str(setting("prefix") or ""),
            endpoint_url=setting("endpoint_url"),
            region=region,
            addressing_style=setting("addressing_style"),
        )
    raise ValueError(
        f"unknown artifact store kind {kind!r} (from CONSISTORY_STORE or 'kind'); use 'local' or 's3'"
    )
