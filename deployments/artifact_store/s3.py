"""The S3 (or S3-compatible) artifact store.

S3 credentials come only from boto3's normal chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and config files, instance or pod roles).
"""

from __future__ import annotations

import io
from typing import Any, Iterator, Sequence

import numpy as np

from botocore.exceptions import BotoCoreError, ClientError

from .base import (
    ArtifactNotFound,
    ArtifactStore,
    ArtifactStoreError,
    StoredArtifact,
    store_errors,
    validate_key,
    validate_prefix,
)

__all__ = ["S3ArtifactStore"]

# SigV4 presigned URLs are valid for at most 7 days.
_MAX_PRESIGN_EXPIRES_S = 7 * 24 * 3600
# S3 DeleteObjects accepts at most 1000 keys per call.
_DELETE_BATCH = 1000
# Transfers: a single PUT is capped at 5 GB and anchor caches run 4-22 GB, so put/get go
# through boto3's managed transfer (multipart upload, parallel ranged GETs) above a threshold.
_MIB = 1024 * 1024
_DEFAULT_MULTIPART_THRESHOLD = 64 * _MIB
_DEFAULT_MULTIPART_CHUNKSIZE = 64 * _MIB
_MAX_CONCURRENCY = 4


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
        multipart_threshold: int = _DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize: int = _DEFAULT_MULTIPART_CHUNKSIZE,
    ) -> None:
        if not bucket:
            raise ValueError("S3ArtifactStore needs a bucket name")
        if addressing_style not in (None, "auto", "path", "virtual"):
            raise ValueError(
                f"addressing_style must be 'auto', 'path' or 'virtual', got {addressing_style!r}"
            )
        if int(multipart_threshold) < 1 or int(multipart_chunksize) < 1:
            raise ValueError(
                "multipart_threshold and multipart_chunksize must be positive, got "
                f"{multipart_threshold!r} and {multipart_chunksize!r}"
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
        from boto3.s3.transfer import TransferConfig

        # S3 needs parts of at least 5 MiB (but the last); s3transfer raises smaller
        # chunk sizes to that minimum and caps the part count at 10,000 by itself.
        self.transfer_config = TransferConfig(
            multipart_threshold=int(multipart_threshold),
            multipart_chunksize=int(multipart_chunksize),
            max_concurrency=_MAX_CONCURRENCY,
            use_threads=True,
        )

    def _object_key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    @staticmethod
    def _is_not_found(err: Exception) -> bool:
        # By error code, not by HTTP status: NoSuchBucket is a 404 too, and a missing
        # bucket is a configuration error, not a missing artifact. HEAD answers carry no
        # body, so botocore reports their 404 as code "404".
        code = str((getattr(err, "response", None) or {}).get("Error", {}).get("Code", ""))
        return code in ("NoSuchKey", "404", "NotFound")

    @store_errors(BotoCoreError, ClientError, OSError)
    def put(self, key: str, data: bytes, content_type: str) -> None:
        # io.BytesIO(bytes) shares the caller's buffer (copy on write): no second copy of
        # a multi-GB payload.
        self.client.upload_fileobj(
            io.BytesIO(data),
            self.bucket,
            self._object_key(key),
            ExtraArgs={"ContentType": content_type},
            Config=self.transfer_config,
        )

    @store_errors(BotoCoreError, ClientError, OSError)
    def put_parts(self, key: str, parts: Sequence[Any], content_type: str) -> None:
        # Read straight from the parts: s3transfer copies one multipart chunk at a time, never
        # the whole payload.
        self.client.upload_fileobj(
            _PartsReader(parts),
            self.bucket,
            self._object_key(key),
            ExtraArgs={"ContentType": content_type},
            Config=self.transfer_config,
        )

    @store_errors(BotoCoreError, ClientError, OSError)
    def get_buffer(self, key: str) -> Any:
        """Ranged parallel GETs straight into one preallocated buffer (one copy, no second)."""
        from botocore.exceptions import ClientError

        object_key = self._object_key(key)
        try:
            size = int(self.client.head_object(Bucket=self.bucket, Key=object_key)["ContentLength"])
        except ClientError as err:
            if not self._is_not_found(err):
                raise
            return self._get_after_not_found(key, object_key)
        buffer = np.empty(size, dtype=np.uint8)
        if size:
            try:
                self.client.download_fileobj(
                    self.bucket, object_key, _BufferWriter(buffer), Config=self.transfer_config
                )
            except ClientError as err:
                if not self._is_not_found(err):
                    raise
                raise ArtifactNotFound(key) from None  # deleted between the HEAD and the GET
        return buffer

    @store_errors(BotoCoreError, ClientError, OSError)
    def create_exclusive(self, key: str, data: bytes, content_type: str) -> bool:
        # S3's conditional write: If-None-Match: * fails with 412 when the key exists.
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._object_key(key), Body=data,
                                   ContentType=content_type, IfNoneMatch="*")
        except ClientError as err:
            code = str((getattr(err, "response", None) or {}).get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise
        return True

    @store_errors(BotoCoreError, ClientError, OSError)
    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        object_key = self._object_key(key)
        buffer = io.BytesIO()
        try:
            self.client.download_fileobj(
                self.bucket, object_key, buffer, Config=self.transfer_config
            )
        except ClientError as err:
            if not self._is_not_found(err):
                raise  # e.g. 403: a permissions problem must not read as "absent"
            return self._get_after_not_found(key, object_key)
        return buffer.getvalue()

    def _get_after_not_found(self, key: str, object_key: str) -> bytes:
        """Tell a missing key (ArtifactNotFound) from a missing bucket (re-raised).

        ``download_fileobj`` starts with a HeadObject, whose 404 has no body: a missing key
        and a missing bucket both read as code "404". A plain GetObject tells them apart
        (``NoSuchKey`` vs ``NoSuchBucket``) with no permission beyond the one ``get`` needs.
        """
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=object_key)
        except ClientError as err:
            if self._is_not_found(err):
                raise ArtifactNotFound(key) from None
            raise  # NoSuchBucket, 403, ...
        # The object appeared after the HEAD (a concurrent put): serve it.
        with response["Body"] as body:
            return body.read()

    @store_errors(BotoCoreError, ClientError, OSError)
    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as err:
            if self._is_not_found(err):
                return False
            raise  # e.g. 403: a permissions problem must not read as "absent"
        return True

    @store_errors(BotoCoreError, ClientError, OSError)
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

    def list_prefix(self, prefix: str) -> Iterator[StoredArtifact]:
        validate_prefix(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for obj in page.get("Contents", []):
                    yield StoredArtifact(obj["Key"][len(self.prefix):], obj["Size"], obj["LastModified"].timestamp())
        except (BotoCoreError, ClientError) as error:
            raise ArtifactStoreError(f"could not list s3://{self.bucket}/{self.prefix}{prefix}: {error}") from error

    def _delete_batch(self, batch: list[dict[str, str]]) -> int:
        response = self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
        )
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            raise ArtifactStoreError(
                f"S3 refused to delete {len(errors)} of {len(batch)} objects in bucket "
                f"{self.bucket!r}; first: {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
            )
        return len(batch)

    @store_errors(BotoCoreError, ClientError, OSError)
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


class _PartsReader(io.RawIOBase):
    """A read-only file over a sequence of buffers, without joining them."""

    def __init__(self, parts: Sequence[Any]) -> None:
        self._parts = [memoryview(p).cast("B") for p in parts]
        self._index = 0
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        out = memoryview(target).cast("B")
        written = 0
        while written < len(out) and self._index < len(self._parts):
            part = self._parts[self._index]
            n = min(len(out) - written, len(part) - self._offset)
            out[written : written + n] = part[self._offset : self._offset + n]
            written += n
            self._offset += n
            if self._offset == len(part):
                self._index, self._offset = self._index + 1, 0
        return written


class _BufferWriter(io.RawIOBase):
    """A seekable writable file over a preallocated buffer (s3transfer writes ranges out of order)."""

    def __init__(self, buffer: np.ndarray) -> None:
        self._view = memoryview(buffer).cast("B")
        self._position = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def write(self, data) -> int:
        chunk = memoryview(data).cast("B")
        end = self._position + len(chunk)
        if end > len(self._view):
            raise IOError(f"the object is larger than its HEAD said ({end} > {len(self._view)} bytes)")
        self._view[self._position : end] = chunk
        self._position = end
        return len(chunk)
