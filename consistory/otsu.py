"""Otsu's threshold, batched over many maps at once on the device."""

from __future__ import annotations

import torch


def _otsu(values: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared core: per-row bin index of every value (X, N), the chosen split (X,), and the
    split's upper edge in value units (X,). Constant rows get split = bins - 1 (no foreground)."""
    x = values.float()
    lo = x.amin(dim=1, keepdim=True)
    hi = x.amax(dim=1, keepdim=True)
    span = hi - lo
    constant = span.squeeze(1) <= 0
    span = span.clamp_min(torch.finfo(torch.float32).tiny)
    index = ((x - lo) / span * bins).long().clamp_(0, bins - 1)  # (X, N)
    hist = torch.zeros(x.shape[0], bins, device=x.device)
    hist.scatter_add_(1, index, torch.ones_like(x))
    centres = (torch.arange(bins, device=x.device, dtype=torch.float32) + 0.5) / bins  # in [0, 1]

    w0 = hist.cumsum(1)  # counts at or below each split
    w1 = hist.sum(1, keepdim=True) - w0
    m0 = (hist * centres).cumsum(1)
    m1 = (hist * centres).sum(1, keepdim=True) - m0
    between = w0 * w1 * (m0 / w0.clamp_min(1) - m1 / w1.clamp_min(1)) ** 2  # 0 where a class is empty
    split = between.argmax(dim=1)
    split = torch.where(constant, torch.full_like(split, bins - 1), split)
    edge = lo.squeeze(1) + (split + 1).float() / bins * span.squeeze(1)
    return index, split, edge


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu threshold of each row of `values` (X, N) -> (X,): the upper edge of the lower class
    in a `bins`-bin histogram over the row's own [min, max]."""
    return _otsu(values, bins)[2]


def otsu_mask(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Boolean foreground (upper class) of each row of `values` (X, N); empty for a constant row."""
    index, split, _ = _otsu(values, bins)
    return index > split[:, None]


def otsu_below(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Boolean lower class of each row of `values` (X, N) (e.g. distances under the threshold);
    empty for a constant row."""
    index, split, _ = _otsu(values, bins)
    constant = values.float().amax(1) <= values.float().amin(1)
    return (index <= split[:, None]) & ~constant[:, None]
