"""File objects over in-memory buffers, for s3transfer to read parts from and write ranges into.

They let a multi-GB artifact go up as a multipart upload straight from its parts and come
down by ranged GETs straight into one preallocated buffer, never joined or copied whole.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np

__all__ = ["BufferWriter", "PartsReader"]


class PartsReader(io.RawIOBase):
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


class BufferWriter(io.RawIOBase):
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
