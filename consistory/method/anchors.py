"""Where the anchors' tensors come from: anchor rows in the same batch, or an anchor cache.

Both sources hand the processors the same things in the same layout (shared keys/values of
the tokens inside the anchors' dropout masks; injection sources of the tokens inside their
subject masks), which is what makes "cached equals batch" hold by construction. A live source
can also record what a cache needs into an `AnchorCache`: the *inputs* of each `up`
self-attention layer at the shared tokens (one vector per token instead of a key and a value;
`CachedAnchors` recomputes keys and values with the layer's own projections) and the injection
sources.

Nothing on the per-step path reads a value back from the device: a live source shares a fixed
budget of tokens per anchor (those its dropout draw keeps, known on the host before the loop
starts) and masks out the ones outside the subject mask, which only the device knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .attention_ops import SharedTokens, gather_tokens
from .host_transfers import HostCount, to_device

if TYPE_CHECKING:
    from ..cache.anchor_cache import AnchorCache


@dataclass(frozen=True)
class LayerStep:
    """Which forward of which layer a processor is in."""

    pass_index: int  # 1, or 2 for the pass with feature injection
    step: int
    layer: str  # diffusers' module name, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    grid: str  # the layer's token grid, "fine" or "coarse"


class AnchorSource(Protocol):
    """What the attention processors and the run state ask of the anchors: each call is handed
    what it needs, so a source knows nothing of the run state."""

    uses_dropout: bool  # whether this step's dropout masks of the batch decide what is shared
    row_anchor: torch.Tensor  # (B,) anchor index of each image of the batch, -1 for the others

    def prepare(self, keep: dict[str, torch.Tensor], device: torch.device) -> None:
        """Before the first step: the batch's dropout draws {grid: (S, B, N) bool, on the host},
        row i being what step i keeps."""

    def shared_tokens(
        self, at: LayerStep, attn, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: torch.Tensor | None
    ) -> SharedTokens:
        """The anchors' shared keys/values at `at`; x, k, v are the layer's input and projections
        for the batch's rows of both CFG halves (2B, N, C), `dropout` the batch's dropout masks
        (B, N) on the layer's grid this step (None where they are not drawn)."""

    def injection_bank(self, at: LayerStep, out_cond: torch.Tensor, subject_masks: torch.Tensor) -> torch.Tensor:
        """(M, C) injection sources at `at`; `out_cond` is the batch's conditional attention output
        before any injection (B, N, C), `subject_masks` the batch's pass-1 masks (B, N), fine grid."""

    def correspondence_sources(
        self, dift: torch.Tensor, subject_masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(source DIFT (A, C, H, W), source subject masks (A, N) on the fine grid, row_anchor),
        given the batch's DIFT features (B, C, H, W) and pass-1 masks (B, N) on the fine grid."""

    def end_pass(self, pass_index: int, final_masks: dict[str, torch.Tensor], dift: torch.Tensor | None) -> None:
        """A pass is over; `final_masks` {grid: (B, N)} and `dift` are pass 1's."""


def keep_slots(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep (S, A, N) bool -> (index (S, A * P) long into the A * N anchor tokens, used (S, A * P)
    bool). Each anchor gets P slots, P the most tokens any anchor keeps at any step: its kept
    tokens in order, then padding (unused slots). Host work, once per generation."""
    s, a, n = keep.shape
    p = int(keep.sum(dim=2).max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.uint8), dim=2, stable=True)[..., :p]  # kept tokens first
    used = keep.gather(2, order)
    index = order + torch.arange(a)[:, None] * n
    return index.reshape(s, a * p), used.reshape(s, a * p)


@dataclass
class _Layout:
    """The shared tokens of one step and grid, for every layer of that grid."""

    index: torch.Tensor  # (M,) flat index into each CFG half's B * N tokens, masks' tokens first
    visible: torch.Tensor  # (B, M) which image sees which shared token
    count: HostCount | None = None  # how many tokens are inside the masks


class LiveAnchors:
    """The first `n_anchors` images of the batch are the anchors (a leading slice of every CFG
    half, so no index tensors are needed to find them)."""

    uses_dropout = True

    def __init__(self, n_anchors: int, n_images: int, recorder: "AnchorCache | None" = None) -> None:
        self.n_anchors = n_anchors
        self.row_anchor = torch.where(torch.arange(n_images) < n_anchors, torch.arange(n_images), -1)
        self.recorder = recorder
        self._slots: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # grid -> (index, used), (S, A * P)
        self._layout_key: tuple | None = None
        self._layouts: dict[str, _Layout] = {}
        self._pending: list[tuple] = []  # recorded rows awaiting their token count
        self._bank_index: torch.Tensor | None = None

    def prepare(self, keep, device) -> None:
        for grid, kept in keep.items():
            index, used = keep_slots(kept[:, : self.n_anchors])
            self._slots[grid] = (to_device(index, device), to_device(used, device))

    def _layout(self, at: LayerStep, dropout: torch.Tensor) -> _Layout:
        """Once per step and grid, for all layers of that grid: which anchor tokens are shared
        with which image, computed on the device."""
        key = (at.pass_index, at.step)
        if key != self._layout_key:
            self._record_pending()  # the previous step's counts were read back meanwhile
            self._layout_key, self._layouts = key, {}
        if at.grid in self._layouts:
            return self._layouts[at.grid]
        a, (b, n) = self.n_anchors, dropout.shape
        if at.grid in self._slots:
            index, used = (t[at.step] for t in self._slots[at.grid])
        else:  # no draws were prepared: every anchor token is a slot
            index, used = torch.arange(a * n, device=dropout.device), None
        shared = dropout[:a].reshape(-1)[index]
        if used is not None:
            shared = shared & used
        # The tokens inside the masks first, in the anchors' order, the padding last: a new image
        # then attends to exactly the keys a cache replays, in the same order, and its softmax
        # is computed the same way in both (the masked tail adds exact zeros).
        first = torch.argsort((~shared).to(torch.uint8), stable=True)
        index, shared = index[first], shared[first]
        rows = torch.arange(b, device=dropout.device)
        # An anchor attends to its own tokens as its own, never again as shared ones.
        visible = shared[None] & ((index // n)[None] != rows[:, None])
        layout = _Layout(index, visible)
        if self.recorder is not None:
            layout.count = HostCount(shared.sum())
            self.recorder.put_tokens(at.pass_index, at.step, at.grid, dropout[:a])
        self._layouts[at.grid] = layout
        return layout

    def shared_tokens(self, at, attn, x, k, v, dropout) -> SharedTokens:
        layout = self._layout(at, dropout)
        halves = lambda t: t.reshape(2, -1, t.shape[-1])  # noqa: E731  (2, B * N, C)
        if self.recorder is not None:
            inputs = halves(x).index_select(1, layout.index)
            for half in (0, 1):
                self._pending.append((layout.count, at, half, inputs[half], attn))
        keys = halves(k).index_select(1, layout.index)
        values = halves(v).index_select(1, layout.index)
        return SharedTokens(keys, values, layout.visible)

    def _record_pending(self) -> None:
        """Hand the recorder the rows inside the masks, now that their counts are on the host."""
        for count, at, half, inputs, attn in self._pending:
            self.recorder.put_shared(at.pass_index, at.layer, at.step, half, inputs[: count.get()], attn, at.grid)
        self._pending.clear()

    def injection_bank(self, at, out_cond, subject_masks) -> torch.Tensor:
        if self._bank_index is None:
            self._bank_index = subject_masks[: self.n_anchors].reshape(-1).nonzero().squeeze(1)
        bank = gather_tokens(out_cond[: self.n_anchors], self._bank_index)
        if self.recorder is not None:  # taken before any row is modified
            self.recorder.put_injection(at.layer, at.step, bank)
        return bank

    def correspondence_sources(self, dift, subject_masks):
        a = self.n_anchors
        return dift[:a], subject_masks[:a], self.row_anchor.to(dift.device)

    def end_pass(self, pass_index, final_masks, dift) -> None:
        self._record_pending()
        self._layout_key, self._layouts = None, {}
        if pass_index != 1:
            return
        a = self.n_anchors
        # The pass-1 subject masks are fixed for all of pass 2: its injection sources' index is
        # found here, between the passes, rather than inside the loop.
        self._bank_index = final_masks["fine"][:a].reshape(-1).nonzero().squeeze(1)
        if self.recorder is not None:
            masks = {name: m[:a] for name, m in final_masks.items()}
            self.recorder.put_anchor_features(dift[:a] if dift is not None else None, masks)


class CachedAnchors:
    """Anchors replayed from an `AnchorCache`; the batch holds only new images."""

    uses_dropout = False  # new images share nothing: their dropout masks would go unused

    def __init__(self, cache: "AnchorCache", n_images: int) -> None:
        self.cache = cache
        self.row_anchor = torch.full((n_images,), -1)

    def prepare(self, keep, device) -> None:
        pass

    def shared_tokens(self, at, attn, x, k, v, dropout) -> SharedTokens:
        inputs = [self.cache.shared_inputs(at.pass_index, at.layer, at.step, h, at.grid, device=x.device,
                                           dtype=x.dtype) for h in (0, 1)]
        m = inputs[0].shape[0]
        both = torch.cat(inputs)
        # The layer's own projections (square, no bias on SDXL) give the anchors' keys and
        # values; both CFG halves in one product. New images see every anchor token.
        keys, values = attn.to_k(both), attn.to_v(both)
        return SharedTokens(keys.reshape(2, m, keys.shape[-1]), values.reshape(2, m, values.shape[-1]))

    def injection_bank(self, at, out_cond, subject_masks) -> torch.Tensor:
        return self.cache.injection(at.layer, at.step, device=out_cond.device, dtype=out_cond.dtype)

    def correspondence_sources(self, dift, subject_masks):
        device = dift.device
        return self.cache.dift.to(device), self.cache.masks["fine"].to(device), self.row_anchor.to(device)

    def end_pass(self, pass_index, final_masks, dift) -> None:
        pass
