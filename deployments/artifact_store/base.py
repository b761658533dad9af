"""Artifact store basics: the key rules and the abstract ``ArtifactStore``.

Keys are '/'-separated relative paths such as ``subjects/<id>/anchor_0.png``; the same key
means the same object on every implementation.
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["ArtifactNotFound", "ArtifactStore", "ArtifactStoreError", "validate_key", "validate_prefix"]


class ArtifactNotFound(KeyError):
    """No artifact is stored under ``key``."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:  # KeyError would print repr(key) only
        return f"no artifact stored under key {self.key!r}"


class ArtifactStoreError(RuntimeError):
    """The store failed (a full disk, a refused write, an unreachable bucket): not the caller's
    fault, worth retrying later. The message may name paths or buckets: log it, do not show it."""


def store_errors(*failures: type[BaseException]) -> Callable[[F], F]:
    """Decorate a store method so that `failures` (the backend's own errors) leave it as
    ArtifactStoreError; ArtifactNotFound and ValueError (a bad key) pass unchanged."""

    def decorate(method: F) -> F:
        @functools.wraps(method)
        def wrapped(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except (ArtifactNotFound, ValueError):
                raise
            except failures as error:
                raise ArtifactStoreError(f"{type(error).__name__}: {error}") from error

        return wrapped  # type: ignore[return-value]

    return decorate


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


@dataclass(frozen=True)
class StoredArtifact:
    key: str
    nbytes: int
    modified_at: float  # unix time of the last write


class ArtifactStore(abc.ABC):
    """Stores bytes by key. Implementations must make ``put`` all-or-nothing."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store ``data`` under ``key``, replacing what was there."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The bytes under ``key``; raises ``ArtifactNotFound`` if there are none."""

    def put_parts(self, key: str, parts: Sequence[Any], content_type: str) -> None:
        """Store the concatenation of ``parts`` (bytes-like buffers) under ``key``, all or
        nothing. Implementations stream the parts instead of joining them into one copy."""
        self.put(key, b"".join(bytes(memoryview(p)) for p in parts), content_type)

    @abc.abstractmethod
    def create_exclusive(self, key: str, data: bytes, content_type: str) -> bool:
        """Store ``data`` under ``key`` only if nothing is there (atomically: of two concurrent
        callers exactly one gets True). The building block of leases."""

    def get_buffer(self, key: str) -> Any:
        """The artifact as a read-only buffer, without a second copy where the store allows
        (a mapped file, a preallocated download buffer); raises ``ArtifactNotFound``."""
        return self.get(key)

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an artifact is stored under ``key``."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every artifact whose key starts with ``prefix`` (a plain string prefix,
        as in S3: ``subjects/ab`` also matches ``subjects/abc/...``). Returns how many."""

    @abc.abstractmethod
    def list_prefix(self, prefix: str) -> Iterator[StoredArtifact]:
        """Every artifact whose key starts with ``prefix`` (as ``delete_prefix`` matches), in
        key order, read lazily (a bucket can hold millions)."""

    @abc.abstractmethod
    def url(self, key: str, expires_s: int = 3600) -> str:
        """A URL a client can GET the artifact from."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line saying where artifacts go, for logs and /readyz."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
