"""How an anchor cache stores what the anchors share, and how it gives it back on replay.

Both codecs record the same things (ALGORITHM.md section 9): the input of every `up`
self-attention layer at the tokens of the anchors' dropout masks, per pass, step and CFG half;
the injection sources; the anchors' DIFT features and final masks. Pass 2 resumes from pass 1
at step S // 10, so pass 2 holds steps S // 10 .. S - 1 only.

- "exact": every tensor as computed, in the model's dtype.
- "compact": 8 bits or fewer per value, decoded on the device layer by layer:
  * pass 2 (steps S//10..S-1): the conditional half in 5 bits, the unconditional half as a 3-bit
    residual against the decoded conditional half;
  * pass 1 before S//10 (the start of every image's trajectory, which pass 2 resumes from): the
    same pairs in 8 and 6 bits;
  * pass 1 from S//10 on is coded against pass 2 at the same step and layer: the two passes
    differ there only by what injection has changed (measured: 0.3-1.3% of the values), and
    pass 1 only decides a new image's final masks and DIFT features from them. Tokens that both
    passes share are taken from pass 2; only the few tokens in pass 1's dropout mask but not in
    pass 2's are stored (5 + 3 bits), with both passes' token masks to put the rows in order;
  * injection sources in 8 bits; DIFT features in float16; masks as booleans.
  See README "Compact anchor caches" for the measurements behind these choices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .quantization import (
    QuantizedRows,
    channel_divisor,
    dequantize_halves,
    dequantize_rows,
    quantize_halves,
    quantize_rows,
    take_rows,
)

if TYPE_CHECKING:
    from .anchor_cache import AnchorCache

CODECS = ("exact", "compact")

# (conditional bits, unconditional residual bits)
PAIR_BITS = (5, 3)
EARLY_PAIR_BITS = (8, 6)
INJECTION_BITS = 8


class ExactCodec:
    name = "exact"

    def __init__(self, cache: "AnchorCache") -> None:
        self.cache = cache

    # --- recording ---
    def put_shared(self, pass_index: int, layer: str, step: int, half: int, x: torch.Tensor, attn, grid: str) -> None:
        self.cache._store(f"shared/p{pass_index}/s{step}/h{half}/{layer}", x)

    def put_tokens(self, pass_index: int, step: int, grid: str, mask: torch.Tensor) -> None:
        pass  # exact caches store every pass in full: no rows to line up

    def put_injection(self, layer: str, step: int, bank: torch.Tensor) -> None:
        self.cache._store(f"inject/s{step}/{layer}", bank)

    def put_dift(self, dift: torch.Tensor) -> None:
        self.cache._store("anchor/dift", dift.float())

    def finish(self) -> None:
        pass

    # --- replay ---
    def shared_inputs(self, pass_index, layer, step, half, grid, device, dtype) -> torch.Tensor:
        return self.cache._fetch(f"shared/p{pass_index}/s{step}/h{half}/{layer}", device).to(dtype)

    def injection(self, layer, step, device, dtype) -> torch.Tensor:
        return self.cache._fetch(f"inject/s{step}/{layer}", device).to(dtype)


def _store_rows(cache: "AnchorCache", base: str, rows: QuantizedRows) -> None:
    cache._store(base + "/q", rows.codes)
    cache._store(base + "/t", rows.token_scale)
    cache._store(base + "/c", rows.channel_scale)


def _fetch_rows(cache: "AnchorCache", base: str, bits: int, device) -> QuantizedRows:
    return QuantizedRows(cache._fetch(base + "/q", device), cache._fetch(base + "/t", device),
                         cache._fetch(base + "/c", device), bits)


class CompactCodec:
    name = "compact"

    def __init__(self, cache: "AnchorCache") -> None:
        self.cache = cache
        self.resume_step = cache.config.injection_steps().start
        self._pending: dict[tuple, torch.Tensor] = {}  # an unconditional half awaiting its pair
        self._weights: dict[str, torch.Tensor] = {}
        self._pass1_late: dict[tuple[int, str], str] = {}  # (step, layer) -> grid
        self._memo: tuple | None = None  # the last decoded pair: (key, (uncond, cond))
        self._order: dict[tuple[int, str], torch.Tensor] = {}

    def _bits(self, pass_index: int, step: int) -> tuple[int, int]:
        return EARLY_PAIR_BITS if pass_index == 1 and step < self.resume_step else PAIR_BITS

    def _weight(self, layer: str, attn) -> torch.Tensor:
        """Column norms of [W_k; W_v]: how much each input channel weighs in what reads it."""
        if layer not in self._weights:
            w = attn.to_k.weight.float().pow(2).sum(0) + attn.to_v.weight.float().pow(2).sum(0)
            self._weights[layer] = w.sqrt()
        return self._weights[layer]

    # --- recording ---
    def put_shared(self, pass_index, layer, step, half, x, attn, grid) -> None:
        key = (pass_index, layer, step)
        if half == 0:
            self._pending[key] = x
            return
        uncond = self._pending.pop(key)
        residual, cond = quantize_halves(uncond, x, *self._bits(pass_index, step), self._weight(layer, attn))
        base = f"shared/p{pass_index}/s{step}/{layer}"
        _store_rows(self.cache, base + "/cond", cond)
        _store_rows(self.cache, base + "/uncond", residual)
        if pass_index == 1 and step >= self.resume_step:
            self._pass1_late[(step, layer)] = grid

    def put_tokens(self, pass_index, step, grid, mask) -> None:
        if step >= self.resume_step:
            self.cache._store(f"tokens/p{pass_index}/s{step}/{grid}", mask)

    def put_injection(self, layer, step, bank) -> None:
        _store_rows(self.cache, f"inject/s{step}/{layer}", quantize_rows(bank, INJECTION_BITS, channel_divisor(bank)))

    def put_dift(self, dift) -> None:
        self.cache._store("anchor/dift", dift.half())

    def finish(self) -> None:
        """Keep, of pass 1 from S // 10 on, only the rows of tokens that pass 2 does not share."""
        self.cache._settle()
        tensors = self.cache.tensors
        for (step, layer), grid in self._pass1_late.items():
            if f"tokens/p2/s{step}/{grid}" not in tensors:
                continue  # one pass only (no injection): pass 1 stays whole
            m1 = tensors[f"tokens/p1/s{step}/{grid}"].reshape(-1)
            m2 = tensors[f"tokens/p2/s{step}/{grid}"].reshape(-1)
            rows = (~m2[m1]).nonzero().squeeze(1).to(tensors[f"shared/p1/s{step}/{layer}/cond/q"].device)
            for part in ("cond", "uncond"):
                base = f"shared/p1/s{step}/{layer}/{part}"
                bits = self._bits(1, step)[0 if part == "cond" else 1]
                whole = QuantizedRows(tensors[base + "/q"], tensors[base + "/t"], tensors[base + "/c"], bits)
                _store_rows(self.cache, f"shared/p1x/s{step}/{layer}/{part}", take_rows(whole, rows))
                for suffix in ("/q", "/t", "/c"):
                    del tensors[base + suffix]
        self._pass1_late.clear()

    # --- replay ---
    def _pair(self, pass_index: int, step: int, layer: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        base = f"shared/p{pass_index}/s{step}/{layer}"
        bits = self._bits(pass_index, step)
        cond = _fetch_rows(self.cache, base + "/cond", bits[0], device)
        residual = _fetch_rows(self.cache, base + "/uncond", bits[1], device)
        return dequantize_halves(residual, cond, torch.float32)

    def _pass1_from_pass2(self, step: int, layer: str, grid: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 1's rows at a step from S // 10 on: pass 2's where it has the token, else its own."""
        key = (step, grid)
        if key not in self._order:  # once per step and grid, for all layers of that grid
            if any(s != step for s, _ in self._order):
                self._order.clear()
            m1 = self.cache._fetch(f"tokens/p1/s{step}/{grid}", device).reshape(-1)
            m2 = self.cache._fetch(f"tokens/p2/s{step}/{grid}", device).reshape(-1)
            from_pass2 = m2.cumsum(0) - 1
            own = (m1 & ~m2).cumsum(0) - 1 + m2.sum()
            self._order[key] = torch.where(m2, from_pass2, own)[m1]
        shared = self._pair(2, step, layer, device)
        base = f"shared/p1x/s{step}/{layer}"
        cond = _fetch_rows(self.cache, base + "/cond", PAIR_BITS[0], device)
        residual = _fetch_rows(self.cache, base + "/uncond", PAIR_BITS[1], device)
        extra = dequantize_halves(residual, cond, torch.float32)
        order = self._order[key]
        return tuple(torch.cat([s, e]).index_select(0, order) for s, e in zip(shared, extra))

    def shared_inputs(self, pass_index, layer, step, half, grid, device, dtype) -> torch.Tensor:
        key = (pass_index, layer, step)
        if self._memo is None or self._memo[0] != key:
            if pass_index == 1 and step >= self.resume_step and f"shared/p1x/s{step}/{layer}/cond/q" in self.cache.tensors:
                pair = self._pass1_from_pass2(step, layer, grid, device)
            else:
                pair = self._pair(pass_index, step, layer, device)
            self._memo = (key, pair)
        return self._memo[1][half].to(dtype)

    def injection(self, layer, step, device, dtype) -> torch.Tensor:
        rows = _fetch_rows(self.cache, f"inject/s{step}/{layer}", INJECTION_BITS, device)
        return dequantize_rows(rows, dtype)


def codec_for(cache: "AnchorCache"):
    if cache.codec == "exact":
        return ExactCodec(cache)
    if cache.codec == "compact":
        return CompactCodec(cache)
    raise ValueError(f"unknown anchor cache codec {cache.codec!r}; choose one of {', '.join(CODECS)}")
