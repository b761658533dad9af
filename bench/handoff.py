"""Hand-off of a full-size compact cache through Ray's object store, as the service does it.

A synthetic cache with the compact layout and the shapes of SDXL at 1024 x 1024, 50 steps,
2 anchors, mean subject-mask fraction 0.5 (random codes: no model is run) goes from one actor
(standing in for the AnchorStage) to another (a Generator) with the service's own transport,
`deployments.replicas.cache_transport`: chunks put into the object store, read in place. Measured: from the
first put to the first decoded layer in the receiver (after one warm-up hand-off, as in a running service, with the object store's memory
prefaulted at start as the cluster configs set it; the first hand-off is reported too), and the receiver's resident memory, private
(anonymous) and mapped shared memory, after it has touched every page of the cache.

For comparison, the path of format version 1: the whole cache as one bytes object, received as
bytes and parsed into tensors.

    python bench/handoff.py --json bench/results/handoff.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from consistory import AnchorCache, ConsiStoryConfig
from consistory.cache.compact_codec import CompactCodec
from consistory.cache.schema import PASS1_ONLY_ROWS, SHARED_ROWS, SUBJECT_ROWS, SelfAttentionLayer, UNetShapes
from consistory.cache.size import MaskStats
from consistory.method.grids import Grids


def synthetic_compact_cache(mask_fraction: float = 0.5, seed: int = 0) -> tuple[AnchorCache, SelfAttentionLayer]:
    """The cache, and the first layer whose shared inputs a new image reads."""
    from diffusers import UNet2DConditionModel

    from consistory.presets.sdxl import unet_config

    with torch.device("meta"):
        unet = UNetShapes.of(UNet2DConditionModel(**unet_config("full")))
    config = ConsiStoryConfig()
    masks = MaskStats.assumed(mask_fraction, config)
    grids = Grids.for_image(config.height, config.width)
    a = config.n_anchors
    rows = {}
    for grid in ("coarse", "fine"):
        rows[(SHARED_ROWS, grid)] = round(a * grids.tokens(grid) * masks.shared[grid])
        rows[(PASS1_ONLY_ROWS, grid)] = round(rows[(SHARED_ROWS, grid)] * masks.pass1_only[grid])
    rows[(SUBJECT_ROWS, "fine")] = round(a * grids.tokens("fine") * masks.subject_fine)
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for spec in CompactCodec.schema(config, a, unet, torch.float16, grids):
        shape = tuple(rows[(spec.rows, spec.grid)] if n is None else n for n in spec.shape)
        if spec.dtype == torch.uint8:  # codes
            tensors[spec.name] = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        elif spec.dtype == torch.bool:  # token and subject masks
            tensors[spec.name] = torch.rand(shape, generator=g) < (mask_fraction if spec.part == "masks" else 0.25)
        elif spec.dtype == torch.float16:  # DIFT features
            tensors[spec.name] = torch.randn(shape, generator=g).half()
        elif None in spec.shape:  # token scales
            tensors[spec.name] = torch.rand(shape, generator=g) * 1e-2
        else:  # channel scales
            tensors[spec.name] = torch.rand(shape, generator=g) + 0.5
    cache = AnchorCache(
        subjects=["dog"], anchor_prompts=["a dog", "a dog"], seeds=[0, 1], config=config,
        model_id="preset:full:0", model_fingerprint="synthetic", dtype="float16", codec="compact", tensors=tensors,
    )
    return cache, next(layer for layer in unet.layers if layer.part == "up" and layer.grid is not None)


def memory() -> dict[str, int]:
    """Resident memory of this process in bytes: total, private (anonymous), shared memory."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def main() -> None:
    import json

    import ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mask-fraction", type=float, default=0.5)
    parser.add_argument("--chunk-mib", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    figures = measure(args.mask_fraction, args.chunk_mib * 2**20)
    for k, v in figures.items():
        print(f"{k:<40} {v:.4g}" if isinstance(v, float) else f"{k:<40} {v}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    ray.shutdown()


def measure(mask_fraction: float = 0.5, chunk_bytes: int = 256 * 2**20) -> dict:
    """Start a local Ray with two actors, hand the synthetic cache over both ways, shut Ray down."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        # The actors below are defined in this module: their workers import it from here.
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
        # As the cluster configs do: the object store faults its shared memory in at start, not
        # during the first puts.
        os.environ.setdefault("RAY_preallocate_plasma_memory", "1")
        ray.init(num_cpus=2, object_store_memory=4 * 10**9, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        return _measure(mask_fraction, chunk_bytes)
    finally:
        if started_here:
            ray.shutdown()


def _measure(mask_fraction: float, chunk_bytes: int) -> dict:
    import ray

    @ray.remote(num_cpus=0.5)
    class Stage:
        """Stands in for the AnchorStage: holds a cache and puts it into the object store."""

        def build(self, fraction: float) -> tuple[int, SelfAttentionLayer]:
            self.cache, first_layer = synthetic_compact_cache(fraction)
            return self.cache.nbytes, first_layer

        def put_chunks(self, chunk: int):
            from deployments.replicas.cache_transport import put_cache

            t = time.perf_counter()
            buffers = self.cache.to_buffers(chunk)
            serialize_s = time.perf_counter() - t
            put_start = time.time()
            handle = put_cache(buffers)
            return handle, put_start, serialize_s, len(buffers.chunks)

        def put_bytes(self):
            data = self.cache.to_bytes()
            put_start = time.time()
            return [ray.put(data)], put_start

    @ray.remote(num_cpus=0.5)
    class Reader:
        """Stands in for a Generator on the same node."""

        def warm(self) -> dict:
            import numpy  # noqa: F401
            import safetensors.torch  # noqa: F401

            from deployments.replicas.cache_transport import get_cache  # noqa: F401

            return memory()

        async def receive_chunks(self, handle, layer: SelfAttentionLayer) -> dict:
            from deployments.replicas.cache_transport import get_cache

            before = memory()
            cache = await get_cache(handle, timeout_s=120)
            cache.shared_inputs(1, layer.name, 1, 0, layer.grid, device="cpu")
            first_use = time.time()
            at_first_use = memory()
            checksum = sum(int(memoryview(c)[::4096].tobytes().count(0)) for c in cache.tensors.chunks)
            return {"first_use": first_use, "before": before, "first": at_first_use, "all": memory(), "checksum": checksum}

        async def receive_bytes(self, refs) -> dict:
            from safetensors.torch import load

            before = memory()
            data = await refs[0]
            tensors = load(data)  # format 1: object store -> bytes -> tensors
            first_use = time.time()
            return {"first_use": first_use, "before": before, "all": memory(), "n": len(tensors)}

    stage, reader = Stage.remote(), Reader.remote()
    nbytes, first_layer = ray.get(stage.build.remote(mask_fraction))
    ray.get(reader.warm.remote())
    # The first hand-off of a fresh Ray instance also faults in the object store's shared memory;
    # a running service has done that long before. Both are reported; the second is the figure.
    handle, cold_start, _, _ = ray.get(stage.put_chunks.remote(chunk_bytes))
    cold = ray.get(reader.receive_chunks.remote(handle, first_layer))
    del handle
    time.sleep(2)  # the owner frees the chunks asynchronously
    handle, put_start, serialize_s, n_chunks = ray.get(stage.put_chunks.remote(chunk_bytes))
    got = ray.get(reader.receive_chunks.remote(handle, first_layer))
    del handle
    time.sleep(2)
    refs, bytes_start = ray.get(stage.put_bytes.remote())
    old = ray.get(reader.receive_bytes.remote(refs))
    del refs

    def growth(seen: dict, when: str, key: str) -> float:
        return (seen[when][key] - seen["before"][key]) / nbytes

    figures = {
        "synthetic_cache_bytes": nbytes,
        "mask_fraction": mask_fraction,
        "chunks": n_chunks,
        "chunk_bytes": chunk_bytes,
        "serialize_s": serialize_s,
        "handoff_s": got["first_use"] - put_start,
        "handoff_cold_object_store_s": cold["first_use"] - cold_start,
        "handoff_rss_growth_fraction": growth(got, "all", "RssAnon"),
        "handoff_rss_growth_fraction_at_first_use": growth(got, "first", "RssAnon"),
        "handoff_shared_mapped_fraction": growth(got, "all", "RssShmem"),
        "handoff_total_rss_growth_fraction": growth(got, "all", "VmRSS"),
        "bytes_path_handoff_s": old["first_use"] - bytes_start,
        "bytes_path_rss_growth_fraction": growth(old, "all", "RssAnon"),
    }
    return figures


if __name__ == "__main__":
    main()
