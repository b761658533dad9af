"""Artifact store: bytes by key, on a local directory (the default) or S3.

The service keeps images, anchor caches and subject records here. Keys are
'/'-separated relative paths such as ``subjects/<id>/anchor_0.png``; the same key
means the same object on every implementation.

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

import abc
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ArtifactNotFound",
    "ArtifactStore",
    "LocalArtifactStore",
    "S3ArtifactStore",
    "artifact_store_from_config",
]

# SigV4 presigned URLs are valid for at most 7 days.
_MAX_PRESIGN_EXPIRES_S = 7 * 24 * 3600
# S3 DeleteObjects accepts at most 1000 keys per call.
_DELETE_BATCH = 1000
# Local writes go to "<dir>/.<random>.artifact-tmp" and are renamed into place.
_TMP_SUFFIX = ".artifact-tmp"


class ArtifactNotFound(KeyError):
    """No artifact is stored under ``key``."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:  # KeyError would print repr(key) only
        return f"no artifact stored under key {self.key!r}"


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative '/'-separated path, else raise ValueError."""
    if not isinstance(key, str):
        raise ValueError(f"artifact key must be a str, got {type(key).__name__}")
    if not key:
        raise ValueError("artifact key is empty")
    if "\\" in key:
        raise ValueError(f"artifact key {key!r} contains a backslash; use '/' as the separator")
    if "\x00" in key:
        raise ValueError(f"artifact key {key!r} contains a NUL character")
    if key.startswith("/"):
        raise ValueError(f"artifact key {key!r} is absolute; keys are relative paths like 'subjects/<id>/x.png'")
    for segment in key.split("/"):
        if segment == "..":
            raise ValueError(f"artifact key {key!r} contains a '..' segment")
        if segment in ("", "."):
            raise ValueError(f"artifact key {key!r} has an empty or '.' path segment")
    return key


def validate_prefix(prefix: str) -> str:
    """Like ``validate_key`` but a trailing '/' is allowed; the empty prefix is refused
    so that a bug can never wipe the whole store."""
    if isinstance(prefix, str) and prefix.endswith("/"):
        validate_key(prefix[:-1])
    else:
        validate_key(prefix)
    return prefix


class ArtifactStore(abc.ABC):
    """Stores bytes by key. Implementations must make ``put`` all-or-nothing."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store ``data`` under ``key``, replacing what was there."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The bytes under ``key``; raises ``ArtifactNotFound`` if there are none."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an artifact is stored under ``key``."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every artifact whose key starts with ``prefix`` (a plain string prefix,
        as in S3: ``subjects/ab`` also matches ``subjects/abc/...``). Returns how many."""

    @abc.abstractmethod
    def url(self, key: str, expires_s: int = 3600) -> str:
        """A URL a client can GET the artifact from."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line saying where artifacts go, for logs and /readyz."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class LocalArtifactStore(ArtifactStore):
    """Artifacts as files under ``root``; ``url`` points at the service's own file route.

    The content type is not stored: the file route infers it from the key's extension.
    """

    def __init__(self, root: str | Path, url_prefix: str = "/v1/artifacts") -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url_prefix = url_prefix.rstrip("/")

    def path(self, key: str) -> Path:
        """The file for ``key``; guaranteed to lie inside ``root`` (symlinks included)."""
        validate_key(key)
        if key.endswith(_TMP_SUFFIX):
            raise ValueError(f"artifact key {key!r} ends with {_TMP_SUFFIX!r}, reserved for partial writes")
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"artifact key {key!r} resolves outside the store root {self.root}")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self.path(key)
        # A concurrent delete_prefix may remove the freshly made directory; try again.
        for attempt in range(3):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=_TMP_SUFFIX)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; artifacts are meant to be served
            os.replace(tmp_name, path)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise

    def get(self, key: str) -> bytes:
        path = self.path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete_prefix(self, prefix: str) -> int:
        validate_prefix(prefix)
        # Every match lies under the directory part of the prefix.
        base_key = prefix.rstrip("/") if prefix.endswith("/") else prefix.rpartition("/")[0]
        base = (self.root / base_key).resolve() if base_key else self.root
        if not base.is_relative_to(self.root) or not base.is_dir():
            return 0
        removed = 0
        for dirpath, _dirnames, filenames in os.walk(base, topdown=False):
            dir_key = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.endswith(_TMP_SUFFIX):
                    continue  # someone's write in progress: not an artifact yet
                key = name if dir_key == "." else f"{dir_key}/{name}"
                if key.startswith(prefix):
                    try:
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
                    except FileNotFoundError:
                        pass
            if dir_key != "." and (dir_key + "/").startswith(prefix):
                try:
                    os.rmdir(dirpath)  # only succeeds if empty
                except OSError:
                    pass
        return removed

    def url(self, key: str, expires_s: int = 3600) -> str:
        validate_key(key)
        return f"{self.url_prefix}/{key}"

    def describe(self) -> str:
        return f"local directory {self.root} (served at {self.url_prefix}/)"


def _normalize_s3_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    if not prefix:
        return ""
    validate_key(prefix)
    return prefix + "/"


class S3ArtifactStore(ArtifactStore):
    """Artifacts as objects ``<prefix><key>`` in an S3 (or S3-compatible) bucket.

    ``prefix`` is normalized to end with '/' (``"runs"`` -> ``"runs/"``).
    ``url`` returns a presigned GET URL.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
        addressing_style: str | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("S3ArtifactStore needs a bucket name")
        if addressing_style not in (None, "auto", "path", "virtual"):
            raise ValueError(
                f"addressing_style must be 'auto', 'path' or 'virtual', got {addressing_style!r}"
            )
        self.bucket = bucket
        self.prefix = _normalize_s3_prefix(prefix)
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        if client is None:
            import boto3
            from botocore.config import Config

            # S3-compatible servers behind a plain host name rarely resolve
            # "<bucket>.<host>", so path-style is the safe default for them.
            style = addressing_style or ("path" if self.endpoint_url else None)
            config = Config(
                # SigV4 for presigned URLs too: botocore may otherwise presign with SigV2,
                # which regions opened since 2014 (and many S3-compatible servers) refuse.
                signature_version="s3v4",
                retries={"mode": "standard", "max_attempts": 5},
                s3={"addressing_style": style} if style else None,
            )
            client = boto3.client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
            )
        self.client = client

    def _object_key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    @staticmethod
    def _is_not_found(err: Exception) -> bool:
        # By error code, not by HTTP status: NoSuchBucket is a 404 too, and a missing
        # bucket is a configuration error, not a missing artifact. HEAD answers carry no
        # body, so botocore reports their 404 as code "404".
        code = str((getattr(err, "response", None) or {}).get("Error", {}).get("Code", ""))
        return code in ("NoSuchKey", "404", "NotFound")

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(
            Bucket=self.bucket, Key=self._object_key(key), Body=data, ContentType=content_type
        )

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as err:
            if self._is_not_found(err):
                raise ArtifactNotFound(key) from None
            raise
        with response["Body"] as body:
            return body.read()

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as err:
            if self._is_not_found(err):
                return False
            raise  # e.g. 403: a permissions problem must not read as "absent"
        return True

    def delete_prefix(self, prefix: str) -> int:
        validate_prefix(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        removed = 0
        batch: list[dict[str, str]] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            for obj in page.get("Contents", []):
                batch.append({"Key": obj["Key"]})
                if len(batch) == _DELETE_BATCH:
                    removed += self._delete_batch(batch)
                    batch = []
        if batch:
            removed += self._delete_batch(batch)
        return removed

    def _delete_batch(self, batch: list[dict[str, str]]) -> int:
        response = self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
        )
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            raise RuntimeError(
                f"S3 refused to delete {len(errors)} of {len(batch)} objects in bucket "
                f"{self.bucket!r}; first: {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
            )
        return len(batch)

    def url(self, key: str, expires_s: int = 3600) -> str:
        if not 1 <= int(expires_s) <= _MAX_PRESIGN_EXPIRES_S:
            raise ValueError(
                f"expires_s must be between 1 and {_MAX_PRESIGN_EXPIRES_S} (7 days), got {expires_s}"
            )
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._object_key(key)},
            ExpiresIn=int(expires_s),
        )

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}"
        if self.endpoint_url:
            where += f" at {self.endpoint_url}"
        if self.region:
            where += f" ({self.region})"
        return where


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
