"""Where the anchors' tensors come from: anchor rows in the same batch, or an anchor cache.

Both sources hand the processors the same things in the same layout (shared keys/values of
the tokens inside the anchors' dropout masks; injection sources of the tokens inside their
subject masks), which is what makes "cached equals batch" hold by construction. A live source
can also record what a cache needs into an `AnchorCache`: the *inputs* of each `up`
self-attention layer at the shared tokens (one vector per token instead of a key and a value;
`CachedAnchors` recomputes keys and values with the layer's own projections) and the injection
sources.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from .attention_ops import gather_shared_tokens, shared_token_index

if TYPE_CHECKING:
    from .anchor_cache import AnchorCache
    from .run_state import RunState

# (keys, values, each anchor's own block of the shared tokens or None)
SharedTokens = tuple[torch.Tensor, torch.Tensor, "list[tuple[int, int]] | None"]


class AnchorSource(Protocol):
    """What the attention processors and the run state ask of the anchors."""

    uses_dropout: bool  # whether this step's dropout masks of the batch decide what is shared
    row_anchor: torch.Tensor  # (B,) anchor index of each image of the batch, -1 for the others

    def shared_tokens(
        self, state: "RunState", layer: str, half: int, attn, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        grid: str,
    ) -> SharedTokens:
        """The anchors' shared keys/values at `layer` for CFG half `half` of this step; x, k, v are
        the layer's input and projections for the batch's rows of that half (B, N, C)."""

    def injection_bank(self, state: "RunState", layer: str, out_cond: torch.Tensor) -> torch.Tensor:
        """(M, C) injection sources at `layer` this step; `out_cond` is the batch's conditional
        attention output before any injection (B, N, C)."""

    def correspondence_sources(self, state: "RunState") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(source DIFT (A, C, H, W), source subject masks (A, N) on the fine grid, row_anchor)."""

    def finish_pass1(self, state: "RunState") -> None:
        """Pass 1 is over: its final masks and DIFT features are in `state`."""


class LiveAnchors:
    """The first `n_anchors` images of the batch are the anchors (a leading slice of every CFG
    half, so no index tensors are needed to find them)."""

    uses_dropout = True

    def __init__(self, n_anchors: int, n_images: int, recorder: "AnchorCache | None" = None) -> None:
        self.n_anchors = n_anchors
        self.row_anchor = torch.where(torch.arange(n_images) < n_anchors, torch.arange(n_images), -1)
        self.recorder = recorder
        self._index_key: tuple | None = None
        self._index: dict[str, tuple[torch.Tensor, list[tuple[int, int]]]] = {}
        self._bank_index: torch.Tensor | None = None

    def _shared_index(self, state: "RunState", grid: str, device) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """(flat token index, each anchor's block) for this step and grid, once for all layers."""
        key = (state.pass_index, state.step)
        if key != self._index_key:
            self._index_key, self._index = key, {}
        if grid not in self._index:
            masks = state.dropout_masks[grid][: self.n_anchors]
            self._index[grid] = shared_token_index(masks.to(device))
            if self.recorder is not None:
                self.recorder.put_tokens(state.pass_index, state.step, grid, masks)
        return self._index[grid]

    def shared_tokens(self, state, layer, half, attn, x, k, v, grid) -> SharedTokens:
        index, blocks = self._shared_index(state, grid, k.device)
        if self.recorder is not None:
            inputs = gather_shared_tokens(x, self.n_anchors, index)
            self.recorder.put_shared(state.pass_index, layer, state.step, half, inputs, attn, grid)
        return gather_shared_tokens(k, self.n_anchors, index), gather_shared_tokens(v, self.n_anchors, index), blocks

    def injection_bank(self, state, layer, out_cond) -> torch.Tensor:
        if self._bank_index is None:  # the pass-1 subject masks are fixed for all of pass 2
            self._bank_index = shared_token_index(state.final_masks["fine"][: self.n_anchors])[0]
        bank = gather_shared_tokens(out_cond, self.n_anchors, self._bank_index.to(out_cond.device))
        if self.recorder is not None:  # taken before any row is modified
            self.recorder.put_injection(layer, state.step, bank)
        return bank

    def correspondence_sources(self, state):
        a = self.n_anchors
        return state.dift[:a], state.final_masks["fine"][:a], self.row_anchor.to(state.dift.device)

    def finish_pass1(self, state) -> None:
        if self.recorder is not None:
            a = self.n_anchors
            masks = {name: m[:a] for name, m in state.final_masks.items()}
            self.recorder.put_anchor_features(state.dift[:a] if state.dift is not None else None, masks)


class CachedAnchors:
    """Anchors replayed from an `AnchorCache`; the batch holds only new images."""

    uses_dropout = False  # new images share nothing: their dropout masks would go unused

    def __init__(self, cache: "AnchorCache", n_images: int) -> None:
        self.cache = cache
        self.row_anchor = torch.full((n_images,), -1)
        self._projected: tuple | None = None  # (key, [(k, v) of each CFG half])

    def shared_tokens(self, state, layer, half, attn, x, k, v, grid) -> SharedTokens:
        key = (state.pass_index, layer, state.step)
        if self._projected is None or self._projected[0] != key:
            inputs = [self.cache.shared_inputs(state.pass_index, layer, state.step, h, grid, device=x.device, dtype=x.dtype)
                      for h in (0, 1)]
            rows = inputs[0].shape[0]
            both = torch.cat(inputs)
            # The layer's own projections (square, no bias on SDXL) give the anchors' keys and
            # values; both CFG halves in one product.
            keys, values = attn.to_k(both), attn.to_v(both)
            self._projected = (key, [(keys[:rows], values[:rows]), (keys[rows:], values[rows:])])
        k_shared, v_shared = self._projected[1][half]
        return k_shared, v_shared, None  # new images see every anchor token

    def injection_bank(self, state, layer, out_cond) -> torch.Tensor:
        return self.cache.injection(layer, state.step, device=out_cond.device, dtype=out_cond.dtype)

    def correspondence_sources(self, state):
        device = state.dift.device
        return self.cache.dift.to(device), self.cache.masks["fine"].to(device), self.row_anchor.to(device)

    def finish_pass1(self, state) -> None:
        pass
