"""The tiny offline SDXL pipeline that tests and smoke runs use."""

from __future__ import annotations

from diffusers import StableDiffusionXLPipeline

from .sdxl import build_preset_sdxl


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL topology with small random weights on CPU in float32; same ``seed``, same weights."""
    return build_preset_sdxl("tiny", seed=seed)
