"""Otsu's threshold, batched over many maps at once on the device.

The convention is scikit-image's `threshold_otsu`, which the published implementation uses:
a `bins`-bin histogram over each map's own [min, max] (bin edges and bin membership exactly as
`numpy.histogram` computes them in float32), the threshold at the *centre* of the first bin that
maximizes the between-class variance, and a constant map's threshold equal to its value. Callers
compare strictly: foreground is `> threshold`, "close" is `< threshold`, so a constant map has
neither.

Nothing here reads a value back to the host: the thresholds stay on the device.
"""

from __future__ import annotations

from typing import Sequence

import torch


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu threshold of each row of `values` (X, N) -> (X,), as `skimage.filters.threshold_otsu`."""
    return otsu_thresholds([values], bins)[0]


def otsu_thresholds(groups: Sequence[torch.Tensor], bins: int = 256) -> list[torch.Tensor]:
    """Thresholds of several batches of rows, (X_i, N_i) -> (X_i,) each, whose row lengths may
    differ (e.g. one batch per token grid). The histograms are built per batch; the split
    search, a sequential scan over the bins, runs once for all rows together."""
    histograms = [_histogram(values.float(), bins) for values in groups]
    counts = torch.cat([h[0] for h in histograms])
    centres = torch.cat([h[1] for h in histograms])
    threshold = _best_split(counts, centres)
    out, start = [], 0
    for _, _, lo, constant in histograms:
        end = start + lo.shape[0]
        out.append(torch.where(constant, lo, threshold[start:end]))
        start = end
    return out


def _histogram(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts (X, bins) float32, bin centres (X, bins), row minimum (X,), constant row (X,))."""
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
    return counts, centres, lo, constant


def _best_split(counts: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """The centre of the bin after which splitting maximizes the between-class variance (X,)."""
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
    return centres.gather(1, best).squeeze(1)


def _sequential_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Cumulative sum along the last axis, accumulated left to right in x's dtype, as numpy's
    cumsum does. torch.cumsum accumulates in float64 on the CPU and in a tree on the GPU; the
    rounding differs, and Otsu's argmax over near-equal variances depends on it. One batched
    add per bin, on contiguous slices; all rows of every caller share the same adds."""
    columns = x.movedim(-1, 0).contiguous()  # (bins, ...)
    out = torch.empty_like(columns)
    out[0] = columns[0]
    for i in range(1, columns.shape[0]):
        torch.add(out[i - 1], columns[i], out=out[i])
    return out.movedim(0, -1)


def otsu_mask(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Boolean foreground of each row of `values` (X, N): strictly above the row's threshold."""
    return values.float() > otsu_threshold(values, bins)[:, None]


def otsu_below(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Boolean "close" part of each row of `values` (X, N) (e.g. distances): strictly below the
    row's threshold."""
    return values.float() < otsu_threshold(values, bins)[:, None]
