"""Is an anchor cache whole? Every tensor its codec and config call for, with the right dtype and
shape for the model's layers, and nothing else.

Only the safetensors header is read (names, dtypes, shapes), so a damaged or foreign cache is
refused with `AnchorCacheError` before any generation starts, instead of failing halfway
through one (or, worse, producing images from the wrong layer).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .cache_codecs import EARLY_PAIR_BITS, INJECTION_BITS, PAIR_BITS
from .cache_layout import LazyTensors, LayoutError, entry
from .cache_size import self_attention_layers
from .grids import Grids

# (dtype, shape), a None in the shape matching any size; rows of one block must agree (checked apart)
Spec = tuple[torch.dtype, tuple[Optional[int], ...]]


def _shape_dtype(cache, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
    tensors = cache.tensors
    if isinstance(tensors, LazyTensors):
        e = entry(key, tensors.entries[key])
        return e.dtype, e.shape
    t = tensors[key]
    return t.dtype, tuple(t.shape)


def _rows_block(base: str, dim: int, bits: int) -> Iterator[tuple[str, Spec]]:
    yield base + "/q", (torch.uint8, (None, dim * bits // 8))
    yield base + "/t", (torch.float32, (None,))
    yield base + "/c", (torch.float32, (dim,))


def expected_tensors(cache, unet, vae_scale_factor: int = 8) -> tuple[dict[str, Spec], set[str]]:
    """(required specs, names that may also be present) for this cache's codec and config."""
    cfg = cache.config
    grids = Grids.for_image(cfg.height, cfg.width, vae_scale_factor)
    a, s = cache.n_anchors, cfg.num_inference_steps
    start = cfg.injection_steps().start
    dtype = getattr(torch, cache.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {cache.dtype!r}")
    required: dict[str, Spec] = {}
    optional: set[str] = set()
    compact = cache.codec == "compact"
    for name, part, level, dim in self_attention_layers(unet):
        grid = {1: "fine", 2: "coarse"}.get(level)
        if grid is None:
            continue
        if part == "up" and cfg.sdsa:
            for step in range(1, s):
                late = step >= start
                if not compact:
                    for p in (1, 2) if cfg.two_passes else (1,):
                        for half in (0, 1):
                            key = f"shared/p{p}/s{step}/h{half}/{name}"
                            if p == 1 or late:
                                required[key] = (dtype, (None, dim))
                            else:
                                optional.add(key)  # pass 2 from step 0 (no resume)
                    continue
                if not late and cfg.two_passes:  # pass 2 from step 0 (no resume)
                    optional.update(k for half in ("cond", "uncond")
                                    for k, _ in _rows_block(f"shared/p2/s{step}/{name}/{half}", dim, PAIR_BITS[0]))
                bits = EARLY_PAIR_BITS if not late else PAIR_BITS
                blocks = [f"shared/p1/s{step}/{name}"] if not late or not cfg.two_passes else [f"shared/p1x/s{step}/{name}"]
                if late and cfg.two_passes:
                    blocks.append(f"shared/p2/s{step}/{name}")
                for base in blocks:
                    for part_name, b in (("cond", bits[0]), ("uncond", bits[1])):
                        required.update(_rows_block(f"{base}/{part_name}", dim, b))
        if grid == "fine" and cfg.feature_injection:
            for step in cfg.injection_steps():
                if compact:
                    required.update(_rows_block(f"inject/s{step}/{name}", dim, INJECTION_BITS))
                else:
                    required[f"inject/s{step}/{name}"] = (dtype, (None, dim))
    if compact and cfg.sdsa:
        for step in range(max(start, 1), s):
            for p in (1, 2) if cfg.two_passes else (1,):
                for grid in ("coarse", "fine"):
                    required[f"tokens/p{p}/s{step}/{grid}"] = (torch.bool, (a, grids.tokens(grid)))
    if cfg.feature_injection:
        channels = unet.up_blocks[0].resnets[-1].out_channels
        required["anchor/dift"] = (torch.float16 if compact else torch.float32, (a, channels, *grids.fine))
    for grid in ("coarse", "fine"):
        required[f"anchor/mask/{grid}"] = (torch.bool, (a, grids.tokens(grid)))
    return required, optional


def structure_problem(cache, unet, vae_scale_factor: int = 8) -> Optional[str]:
    """None if the cache is whole for this UNet, else the first thing wrong with it."""
    try:
        required, optional = expected_tensors(cache, unet, vae_scale_factor)
    except (ValueError, TypeError) as error:
        return f"its settings are unusable ({error})"
    present = set(cache.tensors)
    missing = sorted(set(required) - present)
    if missing:
        return f"it lacks {len(missing)} tensors, e.g. {missing[0]!r}"
    unknown = sorted(present - set(required) - optional)
    if unknown:
        return f"it holds {len(unknown)} tensors its codec does not make, e.g. {unknown[0]!r}"
    rows: dict[str, int] = {}
    for key, (dtype, shape) in required.items():
        try:
            got_dtype, got_shape = _shape_dtype(cache, key)
        except LayoutError as error:
            return str(error)
        if got_dtype != dtype or len(got_shape) != len(shape) or any(
            want is not None and want != got for want, got in zip(shape, got_shape)
        ):
            return f"tensor {key!r} is {got_dtype} {list(got_shape)}, not {dtype} {list(shape)}"
        group = _row_group(key)
        if group is not None and rows.setdefault(group, got_shape[0]) != got_shape[0]:
            return f"the token rows of {group!r} disagree between its tensors"
    return None


def _row_group(key: str) -> Optional[str]:
    """Tensors that hold one row per shared token of the same layer, step and pass: both CFG
    halves (exact), or both halves' codes and scales (compact)."""
    if key.startswith("shared/") and key.endswith(("/q", "/t")):
        return key.rsplit("/", 2)[0]  # drop "/cond|uncond/q|t"
    if key.startswith("shared/") and ("/h0/" in key or "/h1/" in key):
        return key.replace("/h0/", "/h*/").replace("/h1/", "/h*/")
    if key.startswith("inject/") and key.endswith(("/q", "/t")):
        return key.rsplit("/", 1)[0]
    return None
