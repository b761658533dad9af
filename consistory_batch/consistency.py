"""Subject consistency of a set of images: the mean similarity over every pair of them.

The paper's measure is DreamSim (similarity = 1 - DreamSim distance, the cosine of its
embeddings), used where the `dreamsim` package and its weights are present; otherwise the
cosine of CLIP image embeddings. Either way a set of identical images scores 1, and the score
does not depend on the order of the images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from consistory.errors import UsageError

DREAMSIM = "dreamsim"
CLIP_IMAGE = "clip-image-cosine"


def mean_pairwise_similarity(embeddings: torch.Tensor) -> float | None:
    """Mean cosine over the N (N - 1) / 2 unordered pairs of unit rows (N, D); None below 2."""
    n = embeddings.shape[0]
    if n < 2:
        return None
    e = embeddings.double()  # the mean of many cosines near 1 keeps its digits
    cosines = e @ e.T
    pairs = torch.triu_indices(n, n, offset=1)
    return float(cosines[pairs[0], pairs[1]].mean())


class DreamSimEmbedder:
    """DreamSim's embeddings (its distance is 1 - their cosine)."""

    def __init__(self, device: torch.device, cache_dir: str) -> None:
        from dreamsim import dreamsim

        self.device = device
        self.model, self.preprocess = dreamsim(pretrained=True, device=str(device), cache_dir=cache_dir)

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        batch = torch.cat([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        return torch.nn.functional.normalize(self.model.embed(batch).float(), dim=-1).cpu()


def _dreamsim_missing(cache_dir: str) -> str | None:
    """Why DreamSim cannot be used here, or None. Its weights must already be on disk: loading
    it without them would start a download."""
    try:
        import dreamsim  # noqa: F401
    except ImportError:
        return "the dreamsim package is not installed"
    if not any(Path(cache_dir).glob("*pretrain*")):
        return f"DreamSim's weights are not in {cache_dir}"
    return None


def consistency_embedder(kind: str, clip, device: torch.device, dreamsim_cache: str | None):
    """(embedder, metric name, a note saying why this one) for subject consistency."""
    cache_dir = dreamsim_cache or "./models"  # where the dreamsim package keeps its weights by default
    if kind == "clip":
        return clip, CLIP_IMAGE, "asked for with --consistency clip"
    missing = _dreamsim_missing(cache_dir)
    if missing is None:
        return DreamSimEmbedder(device, cache_dir), DREAMSIM, f"DreamSim weights in {cache_dir}"
    if kind == "dreamsim":
        raise UsageError(f"--consistency dreamsim: {missing}; install it (pip install dreamsim) with its weights "
                         "in --dreamsim-cache, or use --consistency clip")
    return clip, CLIP_IMAGE, f"DreamSim not used: {missing}"
