"""Where the anchors' tensors come from: anchor rows in the same batch, or an anchor cache.

Both sources hand the processors the same things in the same layout (shared keys/values of
the tokens inside the anchors' dropout masks; injection sources of the tokens inside their
subject masks), which is what makes "cached equals batch" hold by construction. A live source
can also record everything it hands out into an `AnchorCache`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .attention_ops import gather_shared_tokens, shared_visibility

if TYPE_CHECKING:
    from .anchor_cache import AnchorCache
    from .run_state import RunState


class LiveAnchors:
    """The first `n_anchors` images of the batch are the anchors."""

    def __init__(self, n_anchors: int, n_images: int, recorder: "AnchorCache | None" = None) -> None:
        self.n_anchors = n_anchors
        self.rows = torch.arange(n_anchors)
        # Anchor index of every image in the batch, -1 for the others.
        self.row_anchor = torch.where(torch.arange(n_images) < n_anchors, torch.arange(n_images), -1)
        self.recorder = recorder

    def shared_tokens(self, state: "RunState", layer: str, half: int, k: torch.Tensor, v: torch.Tensor, grid: str):
        rows = self.rows.to(k.device)
        k_shared, v_shared, owner = gather_shared_tokens(k, v, rows, state.dropout_masks[grid][rows])
        if self.recorder is not None:
            self.recorder.put_shared(state.pass_index, layer, state.step, half, k_shared, v_shared)
        return k_shared, v_shared, shared_visibility(owner, self.row_anchor.to(k.device))

    def injection_bank(self, state: "RunState", layer: str, out_cond: torch.Tensor) -> torch.Tensor:
        masks = state.final_masks["fine"][self.rows.to(out_cond.device)]
        bank = out_cond[self.rows.to(out_cond.device)][masks]  # taken before any row is modified
        if self.recorder is not None:
            self.recorder.put_injection(layer, state.step, bank)
        return bank

    def correspondence_sources(self, state: "RunState"):
        """(source DIFT (A, C, H, W), source subject masks (A, N) fine, target_source_index (B,))."""
        rows = self.rows.to(state.dift.device)
        return state.dift[rows], state.final_masks["fine"][rows], self.row_anchor.to(state.dift.device)

    def finish_pass1(self, state: "RunState") -> None:
        if self.recorder is not None:
            rows = self.rows.to(state.dift.device)
            masks = {name: m[rows] for name, m in state.final_masks.items()}
            self.recorder.put_anchor_features(state.dift[rows] if state.dift is not None else None, masks)


class CachedAnchors:
    """Anchors replayed from an `AnchorCache`; the batch holds only new images."""

    def __init__(self, cache: "AnchorCache", n_images: int) -> None:
        self.cache = cache
        self.row_anchor = torch.full((n_images,), -1)

    def shared_tokens(self, state: "RunState", layer: str, half: int, k: torch.Tensor, v: torch.Tensor, grid: str):
        k_shared, v_shared = self.cache.shared(state.pass_index, layer, state.step, half, device=k.device)
        return k_shared, v_shared, None  # new images see every anchor token

    def injection_bank(self, state: "RunState", layer: str, out_cond: torch.Tensor) -> torch.Tensor:
        return self.cache.injection(layer, state.step, device=out_cond.device)

    def correspondence_sources(self, state: "RunState"):
        device = state.dift.device
        return (
            self.cache.dift.to(device),
            self.cache.masks["fine"].to(device),
            self.row_anchor.to(device),
        )

    def finish_pass1(self, state: "RunState") -> None:
        pass
