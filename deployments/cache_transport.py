"""Anchor caches through Ray's object store, in chunks, read in place.

`put_cache` puts each chunk of a serialized cache as its own object (numpy uint8: Ray stores it
without pickling and hands readers a read-only view of shared memory); `get_cache` gathers the
chunks and builds the cache on views of them. On one node nothing is copied after the put; a
reader on another node pulls each chunk once into its node's store, where every replica of that
node shares it.
"""

from __future__ import annotations

import asyncio

import ray

from consistory import AnchorCache
from consistory.cache_layout import CacheBuffers

from .messages import CacheHandle


def put_cache(buffers: CacheBuffers) -> CacheHandle:
    return CacheHandle(header=buffers.header, chunks=tuple(ray.put(c) for c in buffers.chunks), nbytes=buffers.nbytes)


async def get_cache(handle: CacheHandle, timeout_s: float) -> AnchorCache:
    """The cache on views of its chunks. Raises Ray's ObjectLostError (the owner died) or
    asyncio.TimeoutError, and AnchorCacheError for chunks that are not a cache."""
    chunks = await asyncio.wait_for(asyncio.gather(*handle.chunks), timeout=timeout_s)
    return AnchorCache.from_buffers(handle.header, chunks)
