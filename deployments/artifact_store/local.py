"""The local-directory artifact store (the default)."""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from .base import ArtifactNotFound, ArtifactStore, ArtifactStoreError, StoredArtifact, store_errors, validate_key, validate_prefix

__all__ = ["LocalArtifactStore"]

# Local writes go to "<dir>/.<random>.artifact-tmp" and are renamed into place.
_TMP_SUFFIX = ".artifact-tmp"


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
        self.put_parts(key, [data], content_type)

    @store_errors(OSError)
    def put_parts(self, key: str, parts: Sequence[Any], content_type: str) -> None:
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
                for part in parts:
                    f.write(part)
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

    @store_errors(OSError)
    def create_exclusive(self, key: str, data: bytes, content_type: str) -> bool:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=_TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp_name, 0o644)
            try:
                os.link(tmp_name, path)  # fails if the key exists: atomic create-if-absent
            except FileExistsError:
                return False
            return True
        finally:
            os.unlink(tmp_name)

    @store_errors(OSError)
    def get(self, key: str) -> bytes:
        path = self.path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactNotFound(key) from None

    @store_errors(OSError)
    def get_buffer(self, key: str) -> Any:
        """The file mapped copy-on-write: pages load as they are read and are shared with the
        page cache, so a multi-GB cache is never copied into the process."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else b""
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactNotFound(key) from None

    @store_errors(OSError)
    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    @store_errors(OSError)
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

    def list_prefix(self, prefix: str) -> Iterator[StoredArtifact]:
        validate_prefix(prefix)
        base_key = prefix.rstrip("/") if prefix.endswith("/") else prefix.rpartition("/")[0]
        base = (self.root / base_key).resolve() if base_key else self.root
        if not base.is_relative_to(self.root) or not base.is_dir():
            return
        yield from self._listed(base, prefix)

    def _listed(self, directory: Path, prefix: str) -> Iterator[StoredArtifact]:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except FileNotFoundError:
            return  # removed while listed
        except OSError as error:
            raise ArtifactStoreError(f"could not list {directory}: {error.strerror}") from error
        for entry in entries:
            key = Path(entry.path).relative_to(self.root).as_posix()
            if entry.is_dir(follow_symlinks=False):
                if (key + "/").startswith(prefix) or prefix.startswith(key + "/"):
                    yield from self._listed(Path(entry.path), prefix)
            elif key.startswith(prefix) and not entry.name.endswith(_TMP_SUFFIX):
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield StoredArtifact(key, info.st_size, info.st_mtime)

    def url(self, key: str, expires_s: int = 3600) -> str:
        validate_key(key)
        return f"{self.url_prefix}/{key}"

    def describe(self) -> str:
        return f"local directory {self.root} (served at {self.url_prefix}/)"
