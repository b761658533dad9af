"""Seeds and initial latents.

The rule that keeps the three entry points in line: image i of a story seeded `seed` gets seed
`seed + i`. Anchors created with `seed` get `seed + 0 .. seed + n_anchors - 1`, and new images
from that cache default to `seed + n_anchors + j` for the j-th new prompt of a call, so
`generate_story([a1, a2, p1, p2], seed=s)` lines up with `create_anchors([a1, a2], seed=s)`
followed by `generate_from_anchors(cache, [p1, p2])`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .errors import InputError

if TYPE_CHECKING:
    import torch

MAX_SEED = 2**63 - 1


def check_seeds(seeds: Sequence[int]) -> list[int]:
    out = []
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise InputError(f"seeds must be integers in [0, 2**63 - 1] (got {seed!r})")
        out.append(int(seed))
    return out


def consecutive_seeds(first: int, count: int) -> list[int]:
    return check_seeds([first + i for i in range(count)])


def initial_latents(
    seeds: Sequence[int], shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """(B, C, h, w) initial noise, each image drawn from its own CPU generator seeded with its
    seed, so the same seed gives the same latent on any device and in any batch."""
    import torch  # here, so that the command line checks seeds without loading torch

    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=torch.float32) for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)
