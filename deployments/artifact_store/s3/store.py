"""``S3ArtifactStore``: artifacts as objects in an S3 (or S3-compatible) bucket."""

from __future__ import annotations

import io
from typing import Any, Iterator, Sequence

import numpy as np
from botocore.exceptions import ClientError

from ..base import ArtifactNotFound, ArtifactStore, StoredArtifact, validate_key, validate_prefix
from .buffer_io import BufferWriter, PartsReader
from .client import (
    DEFAULT_MULTIPART_CHUNKSIZE,
    DEFAULT_MULTIPART_THRESHOLD,
    check_settings,
    make_client,
    make_transfer_config,
    normalize_prefix,
)
from .errors import is_not_found, is_write_conflict, s3_store_errors
from .listing import delete_objects, list_objects
from .presign import check_expiry, presigned_get_url

__all__ = ["S3ArtifactStore"]


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
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
    ) -> None:
        check_settings(bucket, addressing_style, multipart_threshold, multipart_chunksize)
        self.bucket = bucket
        self.prefix = normalize_prefix(prefix)
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        if client is None:
            client = make_client(self.endpoint_url, self.region, addressing_style)
        self.client = client
        self.transfer_config = make_transfer_config(multipart_threshold, multipart_chunksize)

    def _object_key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    @s3_store_errors
    def put(self, key: str, data: bytes, content_type: str) -> None:
        # io.BytesIO(bytes) shares the caller's buffer (copy on write): no second copy of
        # a multi-GB payload.
        self._upload(key, io.BytesIO(data), content_type)

    @s3_store_errors
    def put_parts(self, key: str, parts: Sequence[Any], content_type: str) -> None:
        # Read straight from the parts: s3transfer copies one multipart chunk at a time, never
        # the whole payload.
        self._upload(key, PartsReader(parts), content_type)

    def _upload(self, key: str, source: io.IOBase, content_type: str) -> None:
        self.client.upload_fileobj(
            source,
            self.bucket,
            self._object_key(key),
            ExtraArgs={"ContentType": content_type},
            Config=self.transfer_config,
        )

    @s3_store_errors
    def get_buffer(self, key: str) -> Any:
        """Ranged parallel GETs straight into one preallocated buffer (one copy, no second)."""
        object_key = self._object_key(key)
        try:
            size = int(self.client.head_object(Bucket=self.bucket, Key=object_key)["ContentLength"])
        except ClientError as err:
            if not is_not_found(err):
                raise
            return self._get_after_not_found(key, object_key)
        buffer = np.empty(size, dtype=np.uint8)
        if size:
            try:
                self.client.download_fileobj(
                    self.bucket, object_key, BufferWriter(buffer), Config=self.transfer_config
                )
            except ClientError as err:
                if not is_not_found(err):
                    raise
                raise ArtifactNotFound(key) from None  # deleted between the HEAD and the GET
        return buffer

    @s3_store_errors
    def create_exclusive(self, key: str, data: bytes, content_type: str) -> bool:
        # S3's conditional write: If-None-Match: * fails when the key exists.
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._object_key(key), Body=data,
                                   ContentType=content_type, IfNoneMatch="*")
        except ClientError as err:
            if is_write_conflict(err):
                return False
            raise
        return True

    @s3_store_errors
    def get(self, key: str) -> bytes:
        object_key = self._object_key(key)
        buffer = io.BytesIO()
        try:
            self.client.download_fileobj(
                self.bucket, object_key, buffer, Config=self.transfer_config
            )
        except ClientError as err:
            if not is_not_found(err):
                raise  # e.g. 403: a permissions problem must not read as "absent"
            return self._get_after_not_found(key, object_key)
        return buffer.getvalue()

    def _get_after_not_found(self, key: str, object_key: str) -> bytes:
        """Tell a missing key (ArtifactNotFound) from a missing bucket (re-raised).

        ``download_fileobj`` starts with a HeadObject, whose 404 has no body: a missing key
        and a missing bucket both read as code "404". A plain GetObject tells them apart
        (``NoSuchKey`` vs ``NoSuchBucket``) with no permission beyond the one ``get`` needs.
        """
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=object_key)
        except ClientError as err:
            if is_not_found(err):
                raise ArtifactNotFound(key) from None
            raise  # NoSuchBucket, 403, ...
        # The object appeared after the HEAD (a concurrent put): serve it.
        with response["Body"] as body:
            return body.read()

    @s3_store_errors
    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as err:
            if is_not_found(err):
                return False
            raise  # e.g. 403: a permissions problem must not read as "absent"
        return True

    @s3_store_errors
    def delete_prefix(self, prefix: str) -> int:
        validate_prefix(prefix)
        return delete_objects(self.client, self.bucket, self.prefix + prefix)

    def list_prefix(self, prefix: str) -> Iterator[StoredArtifact]:
        validate_prefix(prefix)
        yield from list_objects(self.client, self.bucket, self.prefix, prefix)

    @s3_store_errors
    def url(self, key: str, expires_s: int = 3600) -> str:
        expires_s = check_expiry(expires_s)
        return presigned_get_url(self.client, self.bucket, self._object_key(key), expires_s)

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}"
        if self.endpoint_url:
            where += f" at {self.endpoint_url}"
        if self.region:
            where += f" ({self.region})"
        return where
