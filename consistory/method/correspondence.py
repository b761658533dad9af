"""DIFT features and dense correspondence between images (docs/method.md sections 5 and 6),
and the per-image injection plan derived from them (section 7)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .otsu import otsu_below

# Distance given to source tokens outside the source's subject mask: above any cosine distance
# that a real match can have, so they are chosen only when nothing else is available.
MASKED_DISTANCE = 2.0


def gaussian_kernel(size: int, sigma: float, device=None) -> torch.Tensor:
    """(size, size) normalised Gaussian, made where it is used (a host copy would wait)."""
    r = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    k = torch.outer(g, g)
    return k / k.sum()


def smooth_features(features: torch.Tensor, size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    """Smooth every channel of (B, C, H, W) with a size x size Gaussian, zero padding."""
    c = features.shape[1]
    kernel = gaussian_kernel(size, sigma, features.device)
    weight = kernel.expand(c, 1, size, size).contiguous()
    return F.conv2d(features.float(), weight, padding=size // 2, groups=c)


def freeu_backbone_scaled(features: torch.Tensor, b: float) -> torch.Tensor:
    """(B, C, H, W) with its first C // 2 channels times `b`: what FreeU's backbone factor does
    in place to `up_blocks[0]`'s output as `up_blocks[1]` starts (b2 on SDXL)."""
    scaled = features.clone()
    half = features.shape[1] // 2
    scaled[:, :half] = scaled[:, :half] * b
    return scaled


def tokens_at_grid(features: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) features -> (B, N, C) unit-norm tokens on a grid of `shape`."""
    if tuple(features.shape[-2:]) != tuple(shape):
        features = F.interpolate(features.float(), size=shape, mode="bilinear")
    return F.normalize(features.float().flatten(2).transpose(1, 2), dim=-1)


def nearest_sources(
    targets: torch.Tensor,
    sources: torch.Tensor,
    source_masks: torch.Tensor,
    target_source_index: torch.Tensor,
    chunk: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched nearest neighbours from every target token to every source image.

    targets (B, N, C) and sources (A, N, C) are unit-norm tokens; source_masks (A, N) bool;
    target_source_index (B,) gives, for a target that is itself source a, that a (-1 otherwise),
    so that no image is its own source. Returns nn_dist (B, A, N) (inf for the excluded pair)
    and nn_map (B, A, N), the arg-min source token.
    """
    dists, maps = [], []
    for start in range(0, targets.shape[0], chunk):  # bounds memory at (chunk, A, N, N)
        t = targets[start : start + chunk]
        d = 1.0 - torch.einsum("bpc,aqc->bapq", t, sources)  # (b, A, N, N) cosine distance
        d = d.masked_fill(~source_masks[None, :, None, :], MASKED_DISTANCE)
        value, index = d.min(dim=-1)
        own = target_source_index[start : start + chunk]
        is_self = own[:, None] == torch.arange(sources.shape[0], device=own.device)[None, :]  # (b, A)
        dists.append(value.masked_fill(is_self[:, :, None], float("inf")))
        maps.append(index)
    return torch.cat(dists), torch.cat(maps)


@dataclass
class InjectionPlan:
    """Per target token: which token of the source bank replaces it, and whether it is a target.

    The source bank is the concatenation, anchor by anchor, of the sources' tokens inside their
    subject masks, in row-major order: the same layout whether the bank comes from anchors in
    the batch or from an anchor cache.
    """

    bank_index: torch.Tensor  # (B, N) long, index into the source bank (0 where not a target)
    targets: torch.Tensor  # (B, N) bool

    def to(self, device) -> "InjectionPlan":
        return InjectionPlan(self.bank_index.to(device), self.targets.to(device))


def plan_injection(
    nn_dist: torch.Tensor,
    nn_map: torch.Tensor,
    target_masks: torch.Tensor,
    source_masks: torch.Tensor,
    bins: int = 256,
) -> InjectionPlan:
    """Choose, per target token, its best source (image and token) and the tokens to inject.

    Targets are tokens inside the image's subject mask whose best distance is below the Otsu
    threshold of all its best distances, and whose chosen source token lies in the source's
    subject mask (so it is in the bank).
    """
    best, source = nn_dist.min(dim=1)  # (B, N): over source images
    token = nn_map.gather(1, source[:, None]).squeeze(1)  # (B, N)
    n = source_masks.shape[1]
    flat = source * n + token
    in_bank = source_masks.reshape(-1)
    lookup = torch.where(in_bank, in_bank.long().cumsum(0) - 1, -1)  # bank row of each source token
    bank_index = lookup[flat]
    has_source = torch.isfinite(best)
    close = otsu_below(torch.where(has_source, best, torch.zeros_like(best)), bins)
    targets = target_masks & close & has_source & (bank_index >= 0)
    return InjectionPlan(bank_index.clamp_min(0), targets)


def inject_features(
    out: torch.Tensor, bank: torch.Tensor, plan: InjectionPlan, alpha: float
) -> torch.Tensor:
    """out (B, N, C), bank (M, C) -> out with targets blended towards their source tokens."""
    if bank.shape[0] == 0:
        return out
    source = bank[plan.bank_index].to(out.dtype)  # (B, N, C)
    blended = alpha * source + (1.0 - alpha) * out
    return torch.where(plan.targets[..., None], blended, out)
