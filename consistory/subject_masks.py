"""Subject localization from cross-attention (ALGORITHM.md section 2)."""

from __future__ import annotations

from collections import deque
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .grids import Grids
from .otsu import otsu_mask

# Added to a seed before seeding an image's mask-dropout generator, so that the dropout draws are
# not the same random stream as the image's initial noise (which uses the seed itself).
MASK_SEED_OFFSET = 0x9E3779B97F4A7C15


def subject_maps(probs: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    """Cross-attention probabilities (B, heads, N, T) -> per-subject maps (B, S, N).

    Heads are averaged, and a subject's map is the weighted mean of its token pieces' maps.
    """
    return torch.einsum("bnt,bst->bsn", probs.float().mean(dim=1), token_weights)


class CrossAttentionWindow:
    """Keeps the last `window` subject-map records of every coarse cross-attention layer."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._records: dict[str, deque[torch.Tensor]] = {}

    def record(self, layer: str, maps: torch.Tensor) -> None:
        self._records.setdefault(layer, deque(maxlen=self.window)).append(maps)

    def reset(self) -> None:
        self._records.clear()

    def snapshot(self) -> dict[str, list[torch.Tensor]]:
        """The records as they are now (records are never modified in place, so no copies)."""
        return {layer: list(records) for layer, records in self._records.items()}

    def restore(self, snapshot: dict[str, list[torch.Tensor]]) -> None:
        self._records = {layer: deque(records, maxlen=self.window) for layer, records in snapshot.items()}

    def __bool__(self) -> bool:
        return bool(self._records)

    def aggregate(self) -> torch.Tensor:
        """(B, S, N): the mean over layers and kept records."""
        records = [r for layer in self._records.values() for r in layer]
        if not records:
            raise RuntimeError(
                "no cross-attention maps were recorded on the coarse grid (h/4 x w/4): the UNet "
                "needs SDXL's cross-attention blocks at that resolution"
            )
        return torch.stack(records).mean(dim=0)


def masks_from_maps(
    maps: torch.Tensor, present: torch.Tensor, grids: Grids, bins: int, grid_names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Aggregated coarse maps (B, S, Nc) -> subject masks {grid: (B, N) bool}.

    Each subject's map is upsampled bilinearly to the grid, thresholded with Otsu, and the
    masks of the subjects present in the image's prompt are united.
    """
    b, s, _ = maps.shape
    coarse = maps.reshape(b * s, 1, *grids.coarse)
    masks = {}
    for name in grid_names:
        shape = grids.shape(name)
        resized = coarse if shape == grids.coarse else F.interpolate(coarse, size=shape, mode="bilinear")
        per_subject = otsu_mask(resized.reshape(b * s, -1), bins).reshape(b, s, -1)
        masks[name] = (per_subject & present.to(per_subject.device)[:, :, None]).any(dim=1)
    return masks


class MaskDropout:
    """Per-image dropout of subject masks, each image drawing from its own seeded generator.

    Every call draws a full grid of numbers for every image and grid, whatever its mask holds,
    so an image's stream (and so its masks) never depends on the other images in the batch.
    """

    def __init__(self, seeds: Sequence[int], rate: float) -> None:
        self.rate = rate
        self.generators = [torch.Generator().manual_seed((seed + MASK_SEED_OFFSET) % 2**64) for seed in seeds]

    def snapshot(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]

    def restore(self, states: Sequence[torch.Tensor]) -> None:
        for g, state in zip(self.generators, states):
            g.set_state(state)

    def __call__(self, masks: Mapping[str, torch.Tensor], grid_order: Sequence[str]) -> dict[str, torch.Tensor]:
        dropped = {}
        for name in grid_order:
            mask = masks[name]
            keep = torch.stack([torch.rand(mask.shape[1], generator=g) for g in self.generators])
            dropped[name] = mask & (keep >= self.rate).to(mask.device)
        return dropped
