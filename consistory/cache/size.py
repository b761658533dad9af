"""How big an anchor cache is, counted from its codec's schema and the UNet's layer shapes (no
generation needed).

Only the mask sizes depend on the images. `MaskStats` carries them: either measured from a real
cache (`MaskStats.of_cache`), which makes the count agree with that cache's bytes, or assumed
(`MaskStats.assumed`): every anchor's subject mask covers a fraction f of each grid at every
step, its dropout mask f * (1 - mask_dropout), and `pass1_only` of pass 1's shared tokens from
step S // 10 on are missing from pass 2's (which a compact cache stores apart).

Counts are given for the layouts this project has had:
- "exact_v1": keys and values of both passes at steps 1..S-1 (format version 1; for comparison);
- "exact": layer inputs, pass 2 from S // 10 (format version 2, codec "exact");
- "compact": codec "compact" (see `compact_codec`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ..config import ConsiStoryConfig
from ..method.grids import Grids
from .codecs import codec_class
from .schema import GRIDS, PARTS, PASS1_ONLY_ROWS, SHARED_ROWS, SUBJECT_ROWS, TensorSpec, UNetShapes

LAYOUTS = ("exact_v1", "exact", "compact")
# Measured on the tiny and small presets (MaskStats.of_cache): 0.7-4% of pass 1's shared tokens
# from step S // 10 on are not in pass 2's dropout masks; the assumption takes the high end.
ASSUMED_PASS1_ONLY = 0.04
# A float dtype of each size, for counting in `dtype_bytes`.
_FLOATS = {2: torch.float16, 4: torch.float32, 8: torch.float64}


@dataclass(frozen=True)
class MaskStats:
    shared: dict[str, float]  # mean fraction of a grid's tokens in an anchor's dropout mask, per grid
    subject_fine: float  # mean fraction of fine-grid tokens in an anchor's final subject mask
    # per grid, the fraction of pass 1's shared tokens (steps >= S // 10) not in pass 2's
    pass1_only: dict[str, float] | None = None

    @classmethod
    def assumed(cls, mask_fraction: float, config: ConsiStoryConfig, pass1_only: float = ASSUMED_PASS1_ONLY) -> "MaskStats":
        kept = mask_fraction * (1.0 - config.mask_dropout)
        return cls({"coarse": kept, "fine": kept}, mask_fraction, {"coarse": pass1_only, "fine": pass1_only})

    @classmethod
    def of_cache(cls, cache, unet, vae_scale_factor: int = 8) -> "MaskStats":
        """The mean mask sizes behind a real cache, read off its tensors' shapes."""
        cfg = cache.config
        grids = Grids.for_image(cfg.height, cfg.width, vae_scale_factor)
        specs = cache.schema(unet, vae_scale_factor, resumed=False)  # whatever it may hold
        a = cache.n_anchors
        rows: dict[str, list[float]] = {"coarse": [], "fine": []}
        seen = set()
        for spec in specs:  # one tensor of each group of shared rows
            if spec.rows == SHARED_ROWS and spec.group not in seen and spec.name in cache.store:
                seen.add(spec.group)
                rows[spec.grid].append(cache.store.dtype_and_shape(spec.name)[1][0] / (a * grids.tokens(spec.grid)))
        shared = {g: sum(v) / len(v) if v else 0.0 for g, v in rows.items()}
        fine = cache.masks["fine"].float().mean().item() if "fine" in cache.masks else 0.0
        return cls(shared, fine, _pass1_only(cache, specs))


def _pass1_only(cache, specs: list[TensorSpec]) -> dict[str, float]:
    """Per grid, the fraction of pass 1's shared tokens (steps >= S // 10) not in pass 2's."""
    masks = {(spec.at, spec.grid): spec.name for spec in specs if spec.part == "token_masks"}
    out = {}
    for grid in GRIDS:
        own = total = 0
        for ((pass_index, step), g), name in masks.items():
            if pass_index != 1 or g != grid or name not in cache.store:
                continue
            m1 = cache.store.get(name)
            pass2 = masks.get(((2, step), grid))
            total += int(m1.sum())
            own += int((m1 & ~cache.store.get(pass2)).sum()) if pass2 in cache.store else 0
        out[grid] = own / total if total else 0.0
    return out


def count_cache_bytes(
    unet, config: ConsiStoryConfig, masks: MaskStats, layout: str = "exact", dtype_bytes: int = 2,
    vae_scale_factor: int = 8,
) -> dict[str, int]:
    """Bytes of one subject's anchor cache in `layout`, by part. `unet` may live on the meta device."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
    grids = Grids.for_image(config.height, config.width, vae_scale_factor)
    a = config.n_anchors
    # Format version 1 held what an exact cache made without resuming holds, but keys and
    # values instead of the layer inputs: two vectors per shared token.
    v1 = layout == "exact_v1"
    specs = codec_class("exact" if v1 else layout).schema(
        config, a, UNetShapes.of(unet), _FLOATS[dtype_bytes], grids, resumed=not v1
    )
    rows = {}
    for grid in GRIDS:
        shared = a * grids.tokens(grid) * masks.shared[grid]
        rows[(SHARED_ROWS, grid)] = shared
        rows[(PASS1_ONLY_ROWS, grid)] = shared * (masks.pass1_only or {}).get(grid, 0.0)
    rows[(SUBJECT_ROWS, "fine")] = a * grids.tokens("fine") * masks.subject_fine
    sizes: dict[str, float] = defaultdict(float)
    for spec in specs:
        n = spec.nbytes(rows.get((spec.rows, spec.grid), 0.0))
        sizes[spec.part] += 2 * n if v1 and spec.part == "shared" else n
    counted = {part: int(sizes[part]) for part in PARTS}
    counted["total"] = sum(counted.values())
    return counted
