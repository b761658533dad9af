"""The "exact" anchor-cache codec: every tensor as computed, in the model's dtype."""

from __future__ import annotations

import torch

from .codec_base import Codec, injection_name, passes_at
from .schema import SHARED_ROWS, SUBJECT_ROWS, TensorSpec


class ExactCodec(Codec):
    """Every pass stored in full, so no token masks are needed to line rows up."""

    name = "exact"
    dift_dtype = torch.float32

    @staticmethod
    def _shared_name(pass_index: int, step: int, half: int, layer: str) -> str:
        return f"shared/p{pass_index}/s{step}/h{half}/{layer}"

    # --- recording ---
    def put_shared(self, pass_index: int, layer: str, step: int, half: int, x: torch.Tensor, attn, grid: str) -> None:
        self.store.put(self._shared_name(pass_index, step, half, layer), x)

    def put_injection(self, layer: str, step: int, bank: torch.Tensor) -> None:
        self.store.put(injection_name(step, layer), bank)

    # --- replay ---
    def shared_inputs(self, pass_index, layer, step, half, grid, device, dtype) -> torch.Tensor:
        return self.store.get(self._shared_name(pass_index, step, half, layer), device).to(dtype)

    def injection(self, layer, step, device, dtype) -> torch.Tensor:
        return self.store.get(injection_name(step, layer), device).to(dtype)

    # --- schema ---
    @classmethod
    def _shared_specs(cls, config, layer, step, dtype, resumed) -> list[TensorSpec]:
        return [
            TensorSpec(cls._shared_name(p, step, half, layer.name), dtype, (None, layer.dim), "shared", SHARED_ROWS,
                       layer.grid, group=f"shared/p{p}/s{step}/h*/{layer.name}")
            for p in passes_at(config, step, resumed) for half in (0, 1)
        ]

    @classmethod
    def _injection_specs(cls, name, dim, dtype) -> list[TensorSpec]:
        return [TensorSpec(name, dtype, (None, dim), "injection", SUBJECT_ROWS, "fine")]
