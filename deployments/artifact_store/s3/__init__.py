"""The S3 (or S3-compatible) artifact store.

``store`` (``S3ArtifactStore``) is built from ``client`` (its checked arguments, the boto3
client, the transfer settings) and uses ``buffer_io`` (file objects for multipart uploads of
parts and ranged downloads into one buffer), ``listing`` (list and delete under a prefix),
``presign`` (presigned GET URLs) and ``errors`` (what S3's error answers mean).
"""

from __future__ import annotations

from .store import S3ArtifactStore

__all__ = ["S3ArtifactStore"]
