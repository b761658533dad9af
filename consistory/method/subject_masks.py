"""Subject localization from cross-attention (docs/method.md section 2)."""

from __future__ import annotations

from collections import deque
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .grids import Grids
from .otsu import otsu_thresholds

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
    masks of the subjects present in the image's prompt are united. The thresholds of all grids
    are found together, on the device.
    """
    b, s, _ = maps.shape
    coarse = maps.reshape(b * s, 1, *grids.coarse)
    names = list(grid_names)
    resized = [
        (coarse if grids.shape(name) == grids.coarse else F.interpolate(coarse, size=grids.shape(name), mode="bilinear"))
        .reshape(b * s, -1).float()
        for name in names
    ]
    masks = {}
    for name, values, threshold in zip(names, resized, otsu_thresholds(resized, bins)):
        per_subject = (values > threshold[:, None]).reshape(b, s, -1)
        masks[name] = (per_subject & present.to(per_subject.device)[:, :, None]).any(dim=1)
    return masks


class MaskDropout:
    """Per-image dropout of subject masks, each image drawing from its own seeded generator.

    A draw covers a full grid of numbers for every image and grid, whatever its mask holds, so
    an image's stream (and so its masks) never depends on the other images in the batch. All the
    draws of a generation are made up front on the host, in the order a step-by-step draw would
    make them (step by step, grid by grid), so the denoising loop never waits for them.
    """

    def __init__(self, seeds: Sequence[int], rate: float) -> None:
        self.seeds = list(seeds)
        self.rate = rate

    def keep(self, draws: int, tokens: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """{grid: (draws, B, N) bool}: the tokens each image keeps at each of `draws` successive
        draws, for the grids of `tokens` (grid -> token count, in drawing order), on the CPU."""
        sizes = list(tokens.values())
        per_image = []
        for seed in self.seeds:
            g = torch.Generator().manual_seed((seed + MASK_SEED_OFFSET) % 2**64)
            per_image.append(torch.rand(draws * sum(sizes), generator=g).reshape(draws, sum(sizes)))
        if not per_image:
            return {name: torch.zeros(draws, 0, n, dtype=torch.bool) for name, n in tokens.items()}
        kept = torch.stack(per_image, dim=1) >= self.rate  # (draws, B, sum of N)
        return dict(zip(tokens, kept.split(sizes, dim=2)))
