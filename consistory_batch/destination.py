"""DEST of `consistory batch`: a local directory or s3://bucket/prefix, through the artifact store.

Layout under DEST::

    manifest.json                 every story of the spec: done (files, timings) or failed (error)
    stories/<id>/00.png ...       the story's images in prompt order
    stories/<id>/grid.png
    stories/<id>/story.json       written last: a story is finished when this names its key
    eval/scores.json, eval/scatter.png   written by `consistory eval`

The destination travels to the model actors as this small description (not as a client), and
each process opens its own store; S3 credentials come from boto3's usual chain where it runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consistory.errors import UsageError

MANIFEST_KEY = "manifest.json"
STORY_RECORD = "story.json"
EVAL_PREFIX = "eval/"


@dataclass(frozen=True)
class Destination:
    url: str  # as the user wrote it
    root: str | None = None  # local: an absolute directory
    bucket: str | None = None  # s3
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str | None = None

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    def open(self):
        """The artifact store for this destination (one per process)."""
        from deployments.artifact_store import LocalArtifactStore, S3ArtifactStore

        if self.is_s3:
            return S3ArtifactStore(bucket=self.bucket, prefix=self.prefix, endpoint_url=self.endpoint_url,
                                   region=self.region, addressing_style=self.addressing_style)
        return LocalArtifactStore(self.root)


def parse_destination(text: str) -> Destination:
    """`s3://bucket/prefix` (endpoint and region from CONSISTORY_S3_ENDPOINT_URL and
    CONSISTORY_S3_REGION / AWS_REGION, as the service reads them) or a local directory."""
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://"):].partition("/")
        if not bucket:
            raise UsageError(f"{text!r} names no bucket; write s3://bucket/prefix")
        env = os.environ
        return Destination(
            url=text, bucket=bucket, prefix=prefix.strip("/"),
            endpoint_url=env.get("CONSISTORY_S3_ENDPOINT_URL") or None,
            region=env.get("CONSISTORY_S3_REGION") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            addressing_style=env.get("CONSISTORY_S3_ADDRESSING") or None,
        )
    if "://" in text:
        raise UsageError(f"{text!r}: DEST is a local directory or s3://bucket/prefix")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{text} exists and is not a directory")
    return Destination(url=text, root=str(path.resolve()))


def story_file(story_id: str, name: str) -> str:
    return f"stories/{story_id}/{name}"


def read_json(store, key: str) -> Any | None:
    """The JSON object under `key`, or None where there is none (or it is not JSON)."""
    from deployments.artifact_store import ArtifactNotFound

    try:
        return json.loads(store.get(key))
    except ArtifactNotFound:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # a damaged record reads as absent: the story is made again


def write_json(store, key: str, value: Any) -> None:
    store.put(key, (json.dumps(value, indent=2) + "\n").encode(), "application/json")
