"""Subject records and where a subject's artifacts live in the store.

A subject is what one anchor batch made: its record (subject words, anchor prompts, seeds,
config, model) is enough to regenerate the anchors bit for bit (docs/method.md, section 9), so the
record, not the cache, is the subject's source of truth. Keys:

    subjects/<id>/record.json                 the record (written last: its presence means
                                              the subject is complete)
    subjects/<id>/anchor_cache.safetensors    the anchor cache
    subjects/<id>/images/<request>/<i>.png    images, by request and prompt index
    subjects/<id>/inputs/<kind>-<i>.png       uploaded photo anchors and anchor controls (what
                                              a rebuild needs besides the record), as PNG
    owners/<key name>/subjects/<id>           the subject counts for that API key (its slot number)
    owners/<key name>/slots/<n>               one of the key's `max_subjects` places (slots.py)
    forgotten/<id>                            the subject was released or deleted: a record
                                              stored after that is removed again
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from ..artifact_store import ArtifactNotFound, ArtifactStore
from .inputs import StoredImage
from .slots import claim_slot, release_slot

RECORD_FORMAT = "consistory.subject"
RECORD_VERSION = 1
_SUBJECT_ID = re.compile(r"[0-9a-f]{32}")


class UnknownSubject(KeyError):
    """No subject record under this id (never created, deleted, or a malformed id)."""

    def __init__(self, subject_id: str) -> None:
        super().__init__(subject_id)
        self.subject_id = subject_id

    def __str__(self) -> str:
        return (
            f"no subject with id {self.subject_id!r}; create one with POST /v1/subjects "
            "(or POST /v1/stories) and use the subject_id it returns"
        )


class SubjectRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    subject_id: str
    subjects: list[str]
    prompts: list[str]  # the anchor prompts
    seeds: list[int]  # one per anchor prompt: seed, seed + 1, ...
    config: dict[str, Any]  # ConsiStoryConfig.to_dict()
    model: str
    created_at: float
    cache_key: str
    cache_nbytes: int
    cache_codec: str = "exact"
    cache_sha256: Optional[str] = None  # of the stored cache file; a cache that differs is rebuilt
    rebuilds: int = 0  # how often the cache was rebuilt from this record
    owner: Optional[str] = None  # the API key's name that made it (None with auth off)
    # Photo anchors (one per anchor prompt, None where generated) and the anchors' ControlNet
    # controls with their scale: absent for a subject made from prompts alone.
    photos: Optional[list[Optional[StoredImage]]] = None
    controls: Optional[list[Optional[StoredImage]]] = None
    control_scale: Optional[float] = None
    format: str = RECORD_FORMAT
    version: int = RECORD_VERSION

    @property
    def n_anchors(self) -> int:
        return len(self.prompts)

    def default_seeds(self, count: int) -> list[int]:
        """Seeds of new images when the request names none: they continue the anchors'."""
        first = self.seeds[0] + self.n_anchors
        return [first + j for j in range(count)]

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(), indent=1, sort_keys=True).encode()


def new_subject_id() -> str:
    return uuid.uuid4().hex


def new_request_id() -> str:
    # Time first so a subject's image folders list in the order they were made.
    return f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"


def is_subject_id(text: str) -> bool:
    # fullmatch: "$" would also accept a trailing newline
    return isinstance(text, str) and _SUBJECT_ID.fullmatch(text) is not None


def subject_prefix(subject_id: str) -> str:
    return f"subjects/{subject_id}/"


def record_key(subject_id: str) -> str:
    return f"subjects/{subject_id}/record.json"


def cache_key(subject_id: str) -> str:
    return f"subjects/{subject_id}/anchor_cache.safetensors"


def images_prefix(subject_id: str, request_id: str) -> str:
    """Where the images of one request (or job) of a subject are."""
    return f"subjects/{subject_id}/images/{request_id}/"


def image_key(subject_id: str, request_id: str, index: int) -> str:
    return f"{images_prefix(subject_id, request_id)}{index:03d}.png"


_REQUEST_ID = re.compile(r"[0-9]{13}-[0-9a-f]{8}")
_IMAGE_NAME = re.compile(r"[0-9]{3}\.png")


def is_image_key(key: str) -> bool:
    """Whether `key` names a stored image exactly as `image_key` makes them (the only artifacts
    served over HTTP: anchor caches move between replicas only through Ray's object store)."""
    parts = key.split("/")
    return (
        len(parts) == 5
        and parts[0] == "subjects"
        and is_subject_id(parts[1])
        and parts[2] == "images"
        and _REQUEST_ID.fullmatch(parts[3]) is not None
        and _IMAGE_NAME.fullmatch(parts[4]) is not None
    )


def sha256_of(buffers) -> str:
    """The sha256 of a cache file given as its buffers (header and chunks), as the record keeps it."""
    digest = hashlib.sha256()
    for buffer in buffers:
        digest.update(buffer)
    return digest.hexdigest()


# --- ownership: an index per API key, so quotas and listings never scan every subject ---
class OverQuota(Exception):
    def __init__(self, owner: str, count: int, limit: int) -> None:
        super().__init__(
            f"API key {owner!r} has {count} subjects, its limit is {limit}; waiting does not help: delete one "
            "with DELETE /v1/subjects/{id} (GET /v1/subjects lists them), then create this one again"
        )


def owner_key(owner: str, subject_id: str) -> str:
    """Present while the subject counts for its owner; it holds the number of its quota slot."""
    return f"owners/{owner}/subjects/{subject_id}"


def quota_prefix(owner: str) -> str:
    """The owner's numbered quota slots (slots.py), each holding a subject id."""
    return f"owners/{owner}/slots/"


def forgotten_key(subject_id: str) -> str:
    """Written when a subject is released or deleted, before anything of it is removed: a record
    that a model replica stores afterwards (anchors that were still being made) is removed again."""
    return f"forgotten/{subject_id}"


def owned_subject_ids(store: ArtifactStore, owner: str) -> list[str]:
    prefix = f"owners/{owner}/subjects/"
    return [a.key[len(prefix):] for a in store.list_prefix(prefix) if is_subject_id(a.key[len(prefix):])]


def all_subject_ids(store: ArtifactStore) -> list[str]:
    return [a.key.split("/")[1] for a in store.list_prefix("subjects/")
            if a.key.endswith("/record.json") and is_subject_id(a.key.split("/")[1])]


def claim_subject(store: ArtifactStore, owner: Optional[str], subject_id: str, max_subjects: Optional[int]) -> None:
    """Counts a subject against its owner before any work is done for it (raises OverQuota).
    Exact however many requests of a key run at once, on however many Ingress replicas: the
    subject takes one of the owner's `max_subjects` numbered slots, each created only if absent."""
    if owner is None:
        return
    slot = ""
    if max_subjects is not None:
        count = len(owned_subject_ids(store, owner))  # subjects made before slots existed count too
        number = claim_slot(store, quota_prefix(owner), max_subjects, subject_id) if count < max_subjects else None
        if number is None:
            raise OverQuota(owner, max(count, max_subjects), max_subjects)
        slot = str(number)
    store.put(owner_key(owner, subject_id), slot.encode(), "text/plain")


def release_subject(store: ArtifactStore, owner: Optional[str], subject_id: str) -> None:
    """Undo `claim_subject` and remove whatever was stored for the subject, now and (through its
    `forgotten_key`) whatever a model replica still stores for it."""
    store.put(forgotten_key(subject_id), b"", "application/octet-stream")
    store.delete_prefix(subject_prefix(subject_id))
    if owner is not None:
        _unclaim(store, owner, subject_id)


def _unclaim(store: ArtifactStore, owner: str, subject_id: str) -> None:
    try:
        slot = store.get(owner_key(owner, subject_id)).decode()
    except ArtifactNotFound:
        return
    if slot.isdigit():
        release_slot(store, quota_prefix(owner), int(slot), subject_id)
    store.delete_prefix(owner_key(owner, subject_id))


def save_record(store: ArtifactStore, record: SubjectRecord) -> bool:
    """Stores the record, a subject's last write. False, with nothing of the subject left, when
    it was released or deleted meanwhile: the one who released it wrote `forgotten_key` first,
    so either it deletes this record or this check sees the mark."""
    subject_id = record.subject_id
    store.put(record_key(subject_id), record.to_json(), "application/json")
    if store.exists(forgotten_key(subject_id)):
        store.delete_prefix(subject_prefix(subject_id))
        return False
    return True


def load_record(store: ArtifactStore, subject_id: str) -> SubjectRecord:
    if not is_subject_id(subject_id):
        raise UnknownSubject(subject_id)
    try:
        data = store.get(record_key(subject_id))
    except ArtifactNotFound:
        raise UnknownSubject(subject_id) from None
    return SubjectRecord.model_validate_json(data)


def delete_subject(store: ArtifactStore, subject_id: str) -> int:
    """Forget a subject: the record goes first, so nobody sees a subject without its files."""
    if not is_subject_id(subject_id):
        raise UnknownSubject(subject_id)
    if not store.exists(record_key(subject_id)):
        raise UnknownSubject(subject_id)
    try:
        owner = load_record(store, subject_id).owner
    except (UnknownSubject, ValueError):
        owner = None  # unreadable: still deleted
    # No forgotten_key: only a subject still being made stores its record later, and this one
    # is complete; nothing with its id is left behind.
    removed = store.delete_prefix(record_key(subject_id))
    removed += store.delete_prefix(subject_prefix(subject_id))
    if owner is not None:
        _unclaim(store, owner, subject_id)
    return removed
