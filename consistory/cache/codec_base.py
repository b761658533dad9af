"""What every anchor-cache codec does alike: the anchors' DIFT features and final subject masks,
and the walk over the UNet's layers that lists a codec's tensors (`Codec.schema`: the one place,
with the codecs' own name functions, where a cache's tensor names and shapes are spelled)."""

from __future__ import annotations

import torch

from ..config import ConsiStoryConfig
from ..method.grids import Grids
from .schema import GRIDS, SelfAttentionLayer, TensorSpec, UNetShapes
from .store import TensorStore

DIFT = "anchor/dift"


def _mask_name(grid: str) -> str:
    return f"anchor/mask/{grid}"


def injection_name(step: int, layer: str) -> str:
    return f"inject/s{step}/{layer}"


class Codec:
    """A codec records what the anchors share into a `TensorStore` and decodes it on replay;
    `schema` lists the tensors that makes. The DIFT features and final subject masks are
    stored alike by every codec (in its `dift_dtype`)."""

    name: str
    dift_dtype: torch.dtype

    def __init__(self, store: TensorStore, config: ConsiStoryConfig) -> None:
        self.store = store
        self.config = config

    # --- recording ---
    def put_shared(self, pass_index: int, layer: str, step: int, half: int, x: torch.Tensor, attn, grid: str) -> None:
        """The inputs (M, C) of an `up` self-attention layer at the anchors' shared tokens."""
        raise NotImplementedError

    def put_tokens(self, pass_index: int, step: int, grid: str, mask: torch.Tensor) -> None:
        """The anchors' dropout masks (A, N) of a pass, step and grid (for codecs that need them)."""

    def put_injection(self, layer: str, step: int, bank: torch.Tensor) -> None:
        raise NotImplementedError

    def put_features(self, dift: torch.Tensor | None, masks: dict[str, torch.Tensor]) -> None:
        if dift is not None:
            self.store.put(DIFT, dift.to(self.dift_dtype))
        for grid, mask in masks.items():
            self.store.put(_mask_name(grid), mask)

    def finish(self) -> None:
        """Recording is over: last rewrites of what was stored."""

    # --- replay ---
    def shared_inputs(self, pass_index: int, layer: str, step: int, half: int, grid: str, device,
                      dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def injection(self, layer: str, step: int, device, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def dift(self) -> torch.Tensor:
        return self.store.get(DIFT).float()

    def masks(self) -> dict[str, torch.Tensor]:
        return {grid: self.store.get(_mask_name(grid)) for grid in GRIDS if _mask_name(grid) in self.store}

    # --- what a cache holds ---
    @classmethod
    def schema(cls, config: ConsiStoryConfig, n_anchors: int, unet: UNetShapes, dtype: torch.dtype, grids: Grids,
               resumed: bool = True) -> list[TensorSpec]:
        """Every tensor a cache of this codec holds for these settings; `resumed=False`: as made
        with pass 2 run from step 0 rather than resumed from pass 1."""
        specs = []
        for layer in unet.layers:
            if layer.grid is None:
                continue
            if layer.part == "up" and config.sdsa:
                for step in range(1, config.num_inference_steps):
                    specs += cls._shared_specs(config, layer, step, dtype, resumed)
            if layer.grid == "fine" and config.feature_injection:
                for step in config.injection_steps():
                    specs += cls._injection_specs(injection_name(step, layer.name), layer.dim, dtype)
        specs += cls._token_specs(config, n_anchors, grids)
        if config.feature_injection:
            specs.append(TensorSpec(DIFT, cls.dift_dtype, (n_anchors, unet.dift_channels, *grids.fine), "dift"))
        specs += [TensorSpec(_mask_name(grid), torch.bool, (n_anchors, grids.tokens(grid)), "masks") for grid in GRIDS]
        return specs

    @classmethod
    def _shared_specs(cls, config, layer: SelfAttentionLayer, step: int, dtype, resumed: bool) -> list[TensorSpec]:
        raise NotImplementedError

    @classmethod
    def _injection_specs(cls, name: str, dim: int, dtype) -> list[TensorSpec]:
        raise NotImplementedError

    @classmethod
    def _token_specs(cls, config, n_anchors: int, grids: Grids) -> list[TensorSpec]:
        return []


def passes_at(config: ConsiStoryConfig, step: int, resumed: bool) -> list[int]:
    """The passes that share tokens at `step`: pass 2 only from where it resumes."""
    if not config.two_passes:
        return [1]
    return [1, 2] if step >= config.injection_steps().start or not resumed else [1]
