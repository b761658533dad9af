"""Otsu's threshold, batched over many maps at once on the device.

The convention is scikit-image's `threshold_otsu`, which the published implementation uses:
a `bins`-bin histogram over each map's own [min, max] (bin edges and bin membership exactly as
`numpy.histogram` computes them in float32), the threshold at the *centre* of the first bin that
maximizes the between-class variance, and a constant map's threshold equal to its value. Callers
compare strictly: foreground is `> threshold`, "close" is `< threshold`, so a constant map has
neither.
"""

from __future__ import annotations

import torch


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu threshold of each row of `values` (X, N) -> (X,), as `skimage.filters.threshold_otsu`."""
    x = values.float()
    lo = x.amin(dim=1)
    hi = x.amax(dim=1)
    span = hi - lo
    constant = span <= 0

    # The edges as numpy.linspace builds them for float32 data: step = span / bins, then
    # i * step + min, rounded after each operation, and the last edge set to the maximum.
    steps = torch.arange(bins + 1, device=x.device, dtype=torch.float32)
    edges = steps * (span / bins)[:, None] + lo[:, None]
    edges[:, -1] = hi  # (X, bins + 1)

    # numpy.histogram's bin of each value: a float32 estimate, then corrected against the edges
    # (the last bin includes its right edge).
    safe_span = torch.where(constant, torch.ones_like(span), span)
    index = ((x - lo[:, None]) / safe_span[:, None] * bins).long().clamp_(0, bins - 1)
    index = index - (x < edges.gather(1, index)).long()
    index = index + ((x >= edges.gather(1, index + 1)) & (index != bins - 1)).long()
    index = index.clamp_(0, bins - 1)

    counts = torch.zeros(x.shape[0], bins, device=x.device, dtype=torch.float32)
    counts.scatter_add_(1, index, torch.ones_like(x))
    centres = (edges[:, :-1] + edges[:, 1:]) / 2

    # Split after bin k: class 1 is bins 0..k, class 2 bins k+1.. (both non-empty for k < bins - 1:
    # the first bin holds the minimum, the last the maximum). Float32 throughout, in numpy's order
    # of operations, so that near-ties between splits resolve as in scikit-image.
    mass = counts * centres
    weight1 = counts.cumsum(1)  # integer counts: exact in any order
    weight2 = counts.flip(1).cumsum(1).flip(1)
    mass1, mass2_reversed = _sequential_cumsum(torch.stack([mass, mass.flip(1)]))
    mean1 = mass1 / weight1
    mean2 = (mass2_reversed / weight2.flip(1)).flip(1)
    between = weight1[:, :-1] * weight2[:, 1:] * (mean1[:, :-1] - mean2[:, 1:]) ** 2
    best = between.argmax(dim=1, keepdim=True)  # the first maximum, as numpy.argmax
    threshold = centres.gather(1, best).squeeze(1)
    return torch.where(constant, lo, threshold)


def _sequential_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Cumulative sum along the last axis, accumulated left to right in x's dtype, as numpy's
    cumsum does. torch.cumsum accumulates in float64 on the CPU and in a tree on the GPU; the
    rounding differs, and Otsu's argmax over near-equal variances depends on it. One small
    batched add per bin."""
    out = torch.empty_like(x)
    out[..., 0] = x[..., 0]
    for i in range(1, x.shape[-1]):
        torch.add(out[..., i - 1], x[..., i], out=out[..., i])
    return out


def otsu_mask(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Boolean foreground of each row of `values` (X, N): strictly above the row's threshold."""
    return values.float() > otsu_threshold(values, bins)[:, None]


def otsu_below(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Boolean "close" part of each row of `values` (X, N) (e.g. distances): strictly below the
    row's threshold."""
    return values.float() < otsu_threshold(values, bins)[:, None]
