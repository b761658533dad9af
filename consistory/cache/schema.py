"""What an anchor cache holds for a config and a UNet, tensor by tensor: names, dtypes, shapes.

Each codec lists its own tensors as `TensorSpec`s (`codecs.Codec.schema`), next to the code that
writes them; the structure check compares a cache with that list and the byte counter sizes a
cache from it, so no other module spells a tensor's name or shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

# What the row dimension of a spec counts (on the spec's grid): the anchors' tokens inside their
# dropout masks, the part of those that only pass 1 shares from step S // 10 on, and the tokens
# inside their final subject masks.
SHARED_ROWS = "shared"
PASS1_ONLY_ROWS = "pass1_only"
SUBJECT_ROWS = "subject"

# The parts a cache's bytes are reported in.
PARTS = ("shared", "injection", "token_masks", "dift", "masks")
GRIDS = ("coarse", "fine")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int | None, ...]  # a None is one row per token counted by `rows`
    part: str  # one of PARTS
    rows: str | None = None  # what the None in `shape` counts, on `grid`
    grid: str | None = None
    group: str | None = None  # specs of one group hold a row for each of the same tokens
    at: tuple[int, int] | None = None  # (pass, step) that a token mask belongs to

    def nbytes(self, rows: float = 0.0) -> float:
        """Bytes, with `rows` rows where the shape has a None (a mean: it may be fractional)."""
        count = 1.0
        for n in self.shape:
            count *= rows if n is None else n
        return count * self.dtype.itemsize

    def matches(self, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
        return dtype == self.dtype and len(shape) == len(self.shape) and all(
            want is None or want == got for want, got in zip(self.shape, shape)
        )


class SelfAttentionLayer(NamedTuple):
    name: str
    part: str  # "down" or "up"
    grid: str | None  # "fine", "coarse", or None at resolutions the method leaves alone
    dim: int  # channels of the layer's input


@dataclass(frozen=True)
class UNetShapes:
    """The few facts about a UNet that a cache's shapes depend on (it may live on the meta device)."""

    layers: tuple[SelfAttentionLayer, ...]  # every attn1 of the `down` and `up` blocks
    dift_channels: int  # of the first `up` block's output

    @classmethod
    def of(cls, unet) -> "UNetShapes":
        # Resolution level 1 is the fine grid (h/2 x w/2), level 2 the coarse one (h/4 x w/4).
        grid_of_level = {1: "fine", 2: "coarse"}
        n_up = len(unet.up_blocks)
        layers = []
        for name, module in unet.named_modules():
            if not name.endswith("attn1"):
                continue
            head, index = name.split(".")[:2]
            if head == "down_blocks":
                level, part = int(index), "down"
            elif head == "up_blocks":
                level, part = n_up - 1 - int(index), "up"
            else:
                continue
            layers.append(SelfAttentionLayer(name, part, grid_of_level.get(level), module.to_k.out_features))
        return cls(tuple(layers), unet.up_blocks[0].resnets[-1].out_channels)
