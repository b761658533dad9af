"""An anchor cache's bytes: one safetensors file, laid out to be split into chunks and read in place.

The file is plain safetensors (8-byte header length, JSON header, data section), readable with
`safetensors.safe_open`. Two choices make it travel well:
- Tensors are ordered by element size, largest first, so every tensor starts at an offset that is
  a multiple of its element size, also relative to any tensor boundary.
- The data section is cut into chunks of at most `CHUNK_BYTES` at tensor boundaries (recorded in
  the metadata as "chunks"). A chunk is one object in Ray's object store or one part of an S3
  multipart upload; large single objects transfer badly between nodes.
Readers never copy: `LazyTensors` makes each tensor a view into whatever buffer holds its chunk
(a file mapping, a shared-memory object, downloaded bytes) when it is first asked for.
"""

from __future__ import annotations

import bisect
import json
import mmap
import os
import struct
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

CHUNK_BYTES = 256 * 2**20
# Headers of full-size caches are a few MB; safetensors itself allows 100 MB.
MAX_HEADER_BYTES = 16 * 2**20

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class LayoutError(ValueError):
    """The bytes are not a safetensors file this reader accepts."""


@dataclass
class CacheBuffers:
    """A serialized cache: the header (length prefix included) and the data section's chunks."""

    header: bytes
    chunks: list[Any]  # buffers (numpy uint8 arrays, memoryviews), in file order

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(_buffer_len(c) for c in self.chunks)

    def __iter__(self) -> Iterator[Any]:
        yield self.header
        yield from self.chunks


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # offsets in the data section
    end: int


def _buffer_len(buffer: Any) -> int:
    return memoryview(buffer).nbytes


def _raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return flat.view(torch.uint8).numpy()


def serialize(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str], chunk_bytes: int = CHUNK_BYTES) -> CacheBuffers:
    """Tensors and string metadata -> header and chunks (each chunk a new numpy uint8 array)."""
    for key, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {key!r} has dtype {tensor.dtype}, which the cache layout does not store")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    entries: dict[str, Any] = {}
    bounds = [0]
    offset = 0
    for key in order:
        t = tensors[key]
        size = t.numel() * t.element_size()
        if offset > bounds[-1] and offset + size - bounds[-1] > chunk_bytes:
            bounds.append(offset)
        entries[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    bounds.append(offset)
    entries["__metadata__"] = {**metadata, "chunks": json.dumps(bounds)}
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the data section starts 8-byte aligned, as safetensors does
    header = struct.pack("<Q", len(text)) + text

    chunks = [np.empty(end - start, dtype=np.uint8) for start, end in zip(bounds[:-1], bounds[1:])]
    for key in order:
        start, end = entries[key]["data_offsets"]
        if end > start:
            c = bisect.bisect_right(bounds, start) - 1
            chunks[c][start - bounds[c] : end - bounds[c]] = _raw_bytes(tensors[key])
    return CacheBuffers(header, chunks)


def parse_header(data: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
    """(bytes before the data section, metadata, raw tensor entries) from a buffer starting with
    the header. Entries are checked when a tensor is first read (`entry`), so opening a cache of
    tens of thousands of tensors costs one JSON parse."""
    view = memoryview(data)
    if view.nbytes < 8:
        raise LayoutError("the data is too short to be a safetensors file")
    (length,) = struct.unpack("<Q", view[:8])
    if length > MAX_HEADER_BYTES:
        raise LayoutError(f"the safetensors header claims {length} bytes (the limit is {MAX_HEADER_BYTES})")
    if length > view.nbytes - 8:
        raise LayoutError("the safetensors header is truncated")
    try:
        header = json.loads(bytes(view[8 : 8 + length]))
    except ValueError:
        raise LayoutError("the safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise LayoutError("the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LayoutError("the safetensors metadata must map strings to strings")
    return 8 + length, metadata, header


def entry(key: str, spec: Any) -> TensorEntry:
    """A header entry, checked: known dtype, non-negative shape, offsets that match them."""
    try:
        dtype = _DTYPES[spec["dtype"]]
        shape = tuple(int(n) for n in spec["shape"])
        start, end = (int(n) for n in spec["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise LayoutError(f"tensor {key!r} has a malformed header entry") from None
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if min(shape, default=0) < 0 or start < 0 or end - start != count * dtype.itemsize:
        raise LayoutError(f"tensor {key!r}: its offsets do not match its shape and dtype")
    return TensorEntry(dtype, shape, start, end)


def chunk_bounds(metadata: dict[str, str], data_bytes: int) -> list[int]:
    """The chunk boundaries in the data section (one chunk when the file has none recorded)."""
    try:
        bounds = [int(b) for b in json.loads(metadata.get("chunks", "null") or "null") or [0, data_bytes]]
    except (ValueError, TypeError):
        raise LayoutError("the chunk list in the metadata is malformed") from None
    if bounds[0] != 0 or bounds[-1] != data_bytes or any(b > a for b, a in zip(bounds, bounds[1:])):
        raise LayoutError(f"the chunk boundaries do not cover the {data_bytes}-byte data section")
    return bounds


class LazyTensors(Mapping):
    """Tensors by key, each a view into the chunk that holds it, made on first access."""

    def __init__(self, entries: dict[str, Any], chunks: Sequence[Any], bounds: Sequence[int]) -> None:
        if len(chunks) != len(bounds) - 1:
            raise LayoutError(f"{len(chunks)} chunks for {len(bounds) - 1} chunk boundaries")
        for i, chunk in enumerate(chunks):
            if _buffer_len(chunk) != bounds[i + 1] - bounds[i]:
                raise LayoutError(f"chunk {i} holds {_buffer_len(chunk)} bytes, not {bounds[i + 1] - bounds[i]}")
        self.entries = entries  # raw header entries, checked on first access
        self.chunks = list(chunks)
        self.bounds = list(bounds)
        self._views: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self._view(key, entry(key, self.entries[key]))
        return view

    def _view(self, key: str, e: TensorEntry) -> torch.Tensor:
        if e.end == e.start:
            return torch.empty(e.shape, dtype=e.dtype)
        c = bisect.bisect_right(self.bounds, e.start) - 1
        if c >= len(self.chunks) or e.end > self.bounds[c + 1]:
            raise LayoutError(f"tensor {key!r} lies outside its chunk")
        with warnings.catch_warnings():
            # Shared-memory objects and read-only maps are not writable; the cache never writes.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            raw = torch.frombuffer(self.chunks[c], dtype=torch.uint8, count=e.end - e.start, offset=e.start - self.bounds[c])
        return raw.view(e.dtype).reshape(e.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data: the data section, which safetensors allows no holes in."""
        return self.bounds[-1]


def read_buffers(header: Any, chunks: Sequence[Any]) -> tuple[dict[str, str], LazyTensors]:
    """Metadata and lazy tensors from a header and its chunks (as `serialize` made them)."""
    start, metadata, entries = parse_header(header)
    data_bytes = sum(_buffer_len(c) for c in chunks)
    return metadata, LazyTensors(entries, chunks, chunk_bounds(metadata, data_bytes))


def read_buffer(data: Any) -> tuple[dict[str, str], LazyTensors, CacheBuffers]:
    """Metadata, lazy tensors and chunk views from one buffer holding the whole file."""
    start, metadata, entries = parse_header(data)
    view = memoryview(data)
    bounds = chunk_bounds(metadata, view.nbytes - start)
    chunks = [view[start + a : start + b] for a, b in zip(bounds[:-1], bounds[1:])]
    return metadata, LazyTensors(entries, chunks, bounds), CacheBuffers(bytes(view[:start]), chunks)


def map_file(path: str | os.PathLike) -> mmap.mmap:
    """The file mapped copy-on-write: pages are read from the page cache as they are touched,
    shared with every other reader, and never written back."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise LayoutError(f"{path} is empty")
        return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)


def write_file(path: str | os.PathLike, buffers: CacheBuffers) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for buffer in buffers:
                f.write(buffer)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
