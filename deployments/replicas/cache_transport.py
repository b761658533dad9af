"""Anchor caches through Ray's object store, in chunks, read in place.

`put_cache` puts the header and each chunk of a serialized cache as objects of their own (numpy
uint8: Ray stores them without pickling and hands readers a read-only view of shared memory);
`get_cache` gathers them and builds the cache on views of the chunks. On one node nothing is
copied after the put; a reader on another node pulls each object once into its node's store,
where every replica of that node shares it. The header goes by reference too: it lists every
tensor (tens of thousands at 1024 px and 50 steps, megabytes of JSON), and a call argument
that large would be stored and pulled again for every request.
"""

from __future__ import annotations

import asyncio

import numpy as np
import ray

from consistory import AnchorCache
from consistory.cache.layout import CacheBuffers

from ..messages import CacheHandle


def put_cache(buffers: CacheBuffers) -> CacheHandle:
    header = ray.put(np.frombuffer(buffers.header, dtype=np.uint8))
    return CacheHandle(header=header, chunks=tuple(ray.put(c) for c in buffers.chunks), nbytes=buffers.nbytes)


async def get_cache(handle: CacheHandle, timeout_s: float) -> AnchorCache:
    """The cache on views of its chunks. Raises Ray's ObjectLostError (the owner died) or
    asyncio.TimeoutError, and AnchorCacheError for objects that are not a cache."""
    header, *chunks = await asyncio.wait_for(asyncio.gather(handle.header, *handle.chunks), timeout=timeout_s)
    # Off the event loop: parsing a header of megabytes must not hold other requests' streams.
    return await asyncio.to_thread(AnchorCache.from_buffers, header.tobytes(), chunks)
