"""How big an anchor cache is, counted from the UNet's layer shapes (no generation needed).

Only the mask sizes depend on the images. `MaskStats` carries them: either measured from a real
cache (`MaskStats.of_cache`), which makes the count agree with that cache's bytes, or assumed
(`MaskStats.assumed`): every anchor's subject mask covers a fraction f of each grid at every
step, its dropout mask f * (1 - mask_dropout), and `pass1_only` of pass 1's shared tokens from
step S // 10 on are missing from pass 2's (which a compact cache stores apart).

Counts are given for the layouts this project has had:
- "exact_v1": keys and values of both passes at steps 1..S-1 (format version 1; for comparison);
- "exact": layer inputs, pass 2 from S // 10 (format version 2, codec "exact");
- "compact": codec "compact" (see cache_codecs).
"""

from __future__ import annotations

from dataclasses import dataclass

from .cache_codecs import EARLY_PAIR_BITS, INJECTION_BITS, PAIR_BITS
from .config import ConsiStoryConfig
from .grids import Grids
from .quantization import packed_bytes

LAYOUTS = ("exact_v1", "exact", "compact")
# Measured on the tiny and small presets (MaskStats.of_cache): 0.7-4% of pass 1's shared tokens
# from step S // 10 on are not in pass 2's dropout masks; the assumption takes the high end.
ASSUMED_PASS1_ONLY = 0.04


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
        layer_grid = {name: _grid(part, level) for name, part, level, _ in self_attention_layers(unet)}
        a = cache.n_anchors
        rows: dict[str, list[float]] = {"coarse": [], "fine": []}
        for key in cache.tensors:
            parts = key.split("/")
            if parts[0] != "shared" or parts[1] == "p1x":
                continue
            if cache.codec == "compact":
                if parts[-2:] != ["cond", "q"]:
                    continue
                layer = "/".join(parts[3:-2])
            else:
                layer = "/".join(parts[4:])
            grid = layer_grid[layer]
            rows[grid].append(cache.tensors[key].shape[0] / (a * grids.tokens(grid)))
        shared = {g: sum(v) / len(v) if v else 0.0 for g, v in rows.items()}
        fine = cache.masks["fine"].float().mean().item() if "fine" in cache.masks else 0.0
        return cls(shared, fine, _pass1_only(cache))


def _pass1_only(cache) -> dict[str, float]:
    """Per grid, the fraction of pass 1's shared tokens (steps >= S // 10) not in pass 2's."""
    out = {}
    for grid in ("coarse", "fine"):
        own = total = 0
        for key in cache.tensors:
            if key.startswith("tokens/p1/") and key.endswith("/" + grid):
                m1 = cache.tensors[key]
                m2 = cache.tensors.get(key.replace("tokens/p1/", "tokens/p2/"))
                total += int(m1.sum())
                own += int((m1 & ~m2).sum()) if m2 is not None else 0
        out[grid] = own / total if total else 0.0
    return out


def self_attention_layers(unet) -> list[tuple[str, str, int, int]]:
    """(name, part, resolution level, inner dim) of every attn1 in `down` and `up` blocks.
    Level 1 is the fine grid, level 2 the coarse grid."""
    layers = []
    n_up = len(unet.up_blocks)
    for name, module in unet.named_modules():
        if not name.endswith("attn1"):
            continue
        head, index = name.split(".")[:2]
        if head == "down_blocks":
            layers.append((name, "down", int(index), module.to_k.out_features))
        elif head == "up_blocks":
            layers.append((name, "up", n_up - 1 - int(index), module.to_k.out_features))
    return layers


def _grid(part: str, level: int) -> str | None:
    return {1: "fine", 2: "coarse"}.get(level)


def count_cache_bytes(
    unet, config: ConsiStoryConfig, masks: MaskStats, layout: str = "exact", dtype_bytes: int = 2,
    vae_scale_factor: int = 8,
) -> dict[str, int]:
    """Bytes of one subject's anchor cache in `layout`, by part. `unet` may live on the meta device."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
    grids = Grids.for_image(config.height, config.width, vae_scale_factor)
    a, s = config.n_anchors, config.num_inference_steps
    two_passes = config.two_passes
    start = config.injection_steps().start
    pass1 = list(range(1, s))  # SDSA acts from step 1
    pass2 = [i for i in range(1, s) if i >= (start if layout != "exact_v1" else 0)] if two_passes else []
    shared = injection = tokens = 0.0
    for _, part, level, dim in self_attention_layers(unet):
        grid = _grid(part, level)
        if grid is None:
            continue
        rows = a * grids.tokens(grid) * masks.shared[grid]
        if part == "up" and config.sdsa:
            own = (masks.pass1_only or {}).get(grid, 0.0)
            shared += _shared_bytes(layout, rows, dim, pass1, pass2, start, own, dtype_bytes)
        if grid == "fine" and config.feature_injection:
            bank = a * grids.tokens("fine") * masks.subject_fine
            per_step = packed_bytes(bank, dim, INJECTION_BITS) if layout == "compact" else bank * dim * dtype_bytes
            injection += len(config.injection_steps()) * per_step
    if layout == "compact" and config.sdsa:
        late = [i for i in pass1 if i >= start]
        passes_with_masks = 2 if two_passes else 1
        tokens = passes_with_masks * len(late) * a * (grids.tokens("fine") + grids.tokens("coarse"))
    dift_channels = unet.up_blocks[0].resnets[-1].out_channels if config.feature_injection else 0
    dift = a * dift_channels * grids.tokens("fine") * (2 if layout == "compact" else 4)
    final_masks = a * (grids.tokens("fine") + grids.tokens("coarse"))
    sizes = {"shared": int(shared), "injection": int(injection), "token_masks": int(tokens), "dift": dift,
             "masks": final_masks}
    sizes["total"] = sum(sizes.values())
    return sizes


def _shared_bytes(layout, rows, dim, pass1, pass2, start, pass1_only, dtype_bytes) -> float:
    if layout == "exact_v1":  # keys and values, two CFG halves
        return 2 * 2 * (len(pass1) + len(pass2)) * rows * dim * dtype_bytes
    if layout == "exact":  # inputs, two CFG halves
        return 2 * (len(pass1) + len(pass2)) * rows * dim * dtype_bytes
    total = 0.0
    for step in pass1:
        bits = EARLY_PAIR_BITS if step < start else PAIR_BITS
        late_from_pass2 = step >= start and pass2
        r = rows * pass1_only if late_from_pass2 else rows
        total += packed_bytes(r, dim, bits[0]) + packed_bytes(r, dim, bits[1])
    for _ in pass2:
        total += packed_bytes(rows, dim, PAIR_BITS[0]) + packed_bytes(rows, dim, PAIR_BITS[1])
    return total
