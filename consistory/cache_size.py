"""How big an anchor cache is, counted from the UNet's layer shapes (no generation needed).

The cache holds, per anchor: keys and values of the tokens inside its dropout mask for every
`up` self-attention layer, step 1..S-1, CFG half and pass; the pre-injection outputs of the
tokens inside its subject mask for every fine-grid `down`/`up` self-attention layer and
injection step; its DIFT features and masks. Only the mask sizes depend on the images, so the
count takes the mean subject-mask fraction as a parameter.
"""

from __future__ import annotations

from .config import ConsiStoryConfig
from .grids import Grids

DIFT_BYTES_PER_VALUE = 4  # DIFT features are kept in float32


def _self_attention_layers(unet) -> list[tuple[str, int, int]]:
    """(part, resolution level, inner dim) of every attn1 in `down` and `up` blocks."""
    layers = []
    n_up = len(unet.up_blocks)
    for name, module in unet.named_modules():
        if not name.endswith("attn1"):
            continue
        head, index = name.split(".")[:2]
        if head == "down_blocks":
            layers.append(("down", int(index), module.to_k.out_features))
        elif head == "up_blocks":
            layers.append(("up", n_up - 1 - int(index), module.to_k.out_features))
    return layers


def estimate_cache_bytes(
    unet, config: ConsiStoryConfig, mask_fraction: float, dtype_bytes: int = 2, vae_scale_factor: int = 8
) -> dict[str, int]:
    """Expected bytes of one subject's anchor cache, by part, for a mean subject-mask fraction.

    `unet` may live on the meta device. Resolution level 1 is the fine grid, level 2 the coarse.
    """
    grids = Grids.for_image(config.height, config.width, vae_scale_factor)
    tokens = {1: grids.tokens("fine"), 2: grids.tokens("coarse")}
    a, s = config.n_anchors, config.num_inference_steps
    passes = 2 if config.two_passes else 1
    keep = 1.0 - config.mask_dropout
    shared = injection = 0.0
    for part, level, dim in _self_attention_layers(unet):
        if level not in tokens:
            continue
        if part == "up" and config.sdsa:
            # k and v, two CFG halves, every pass, steps 1..S-1
            shared += 2 * 2 * passes * (s - 1) * a * mask_fraction * keep * tokens[level] * dim * dtype_bytes
        if level == 1 and config.feature_injection:
            injection += len(config.injection_steps()) * a * mask_fraction * tokens[level] * dim * dtype_bytes
    dift_channels = unet.up_blocks[0].resnets[-1].out_channels if config.feature_injection else 0
    dift = a * dift_channels * tokens[1] * DIFT_BYTES_PER_VALUE
    masks = a * (tokens[1] + tokens[2])
    sizes = {"shared_kv": int(shared), "injection": int(injection), "dift": dift, "masks": masks}
    sizes["total"] = sum(sizes.values())
    return sizes
