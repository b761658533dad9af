"""The "compact" anchor-cache codec: 8 bits or fewer per value, decoded on the device layer by layer.

- pass 2 (steps S//10..S-1): the conditional half in 5 bits, the unconditional half as a 3-bit
  residual against the decoded conditional half;
- pass 1 before S//10 (the start of every image's trajectory, which pass 2 resumes from): the
  same pairs in 8 and 6 bits;
- pass 1 from S//10 on is coded against pass 2 at the same step and layer: the two passes
  differ there only by what injection has changed (measured: 0.3-1.3% of the values), and
  pass 1 only decides a new image's final masks and DIFT features from them. Tokens that both
  passes share are taken from pass 2; only the few tokens in pass 1's dropout mask but not in
  pass 2's are stored (5 + 3 bits), with both passes' token masks to put the rows in order;
- injection sources in 8 bits; DIFT features in float16; masks as booleans.
See README "Compact anchor caches" for the measurements behind these choices.
"""

from __future__ import annotations

import torch

from ..config import ConsiStoryConfig
from ..method.host_transfers import to_device
from .codec_base import Codec, injection_name, passes_at
from .quantization import (
    QuantizedRows,
    channel_divisor,
    dequantize_halves,
    dequantize_rows,
    quantize_halves,
    quantize_rows,
    take_rows,
)
from .schema import GRIDS, PASS1_ONLY_ROWS, SHARED_ROWS, SUBJECT_ROWS, TensorSpec
from .store import TensorStore

# (conditional bits, unconditional residual bits)
PAIR_BITS = (5, 3)
EARLY_PAIR_BITS = (8, 6)
INJECTION_BITS = 8

# The three tensors of a `QuantizedRows` block, by the suffix of their names.
_ROW_PARTS = ("q", "t", "c")


def _rows_specs(base: str, dim: int, bits: int, part: str, rows: str, grid: str, group: str) -> list[TensorSpec]:
    """The tensors of one `QuantizedRows` block: codes and token scales have a row per token,
    the channel scales one value per channel."""
    return [
        TensorSpec(f"{base}/q", torch.uint8, (None, dim * bits // 8), part, rows, grid, group),
        TensorSpec(f"{base}/t", torch.float32, (None,), part, rows, grid, group),
        TensorSpec(f"{base}/c", torch.float32, (dim,), part),
    ]


class CompactCodec(Codec):
    name = "compact"
    dift_dtype = torch.float16

    def __init__(self, store: TensorStore, config: ConsiStoryConfig) -> None:
        super().__init__(store, config)
        self.resume_step = config.injection_steps().start
        self._pending: dict[tuple, torch.Tensor] = {}  # an unconditional half awaiting its pair
        self._weights: dict[str, torch.Tensor] = {}
        self._pass1_late: dict[tuple[int, str], str] = {}  # (step, layer) -> grid
        self._memo: tuple | None = None  # the last decoded pair: (key, (uncond, cond))
        self._orders: tuple | None = None  # (device, {(step, grid): pass 1's row order})

    @staticmethod
    def _pair_name(label: str, step: int, layer: str) -> str:
        """Where the two CFG halves of a layer and step lie; label "p1", "p2", or "p1x" (pass 1's
        own tokens, beside pass 2's)."""
        return f"shared/{label}/s{step}/{layer}"

    @staticmethod
    def _tokens_name(pass_index: int, step: int, grid: str) -> str:
        return f"tokens/p{pass_index}/s{step}/{grid}"

    @staticmethod
    def _bits_at(config: ConsiStoryConfig, pass_index: int, step: int) -> tuple[int, int]:
        return EARLY_PAIR_BITS if pass_index == 1 and step < config.injection_steps().start else PAIR_BITS

    def _weight(self, layer: str, attn) -> torch.Tensor:
        """Column norms of [W_k; W_v]: how much each input channel weighs in what reads it."""
        if layer not in self._weights:
            w = attn.to_k.weight.float().pow(2).sum(0) + attn.to_v.weight.float().pow(2).sum(0)
            self._weights[layer] = w.sqrt()
        return self._weights[layer]

    def _put_rows(self, base: str, rows: QuantizedRows) -> None:
        for suffix, tensor in zip(_ROW_PARTS, (rows.codes, rows.token_scale, rows.channel_scale)):
            self.store.put(f"{base}/{suffix}", tensor)

    def _get_rows(self, base: str, bits: int, device) -> QuantizedRows:
        return QuantizedRows(*(self.store.get(f"{base}/{suffix}", device) for suffix in _ROW_PARTS), bits)

    # --- recording ---
    def put_shared(self, pass_index, layer, step, half, x, attn, grid) -> None:
        key = (pass_index, layer, step)
        if half == 0:
            self._pending[key] = x
            return
        uncond = self._pending.pop(key)
        bits = self._bits_at(self.config, pass_index, step)
        residual, cond = quantize_halves(uncond, x, *bits, self._weight(layer, attn))
        base = self._pair_name(f"p{pass_index}", step, layer)
        self._put_rows(base + "/cond", cond)
        self._put_rows(base + "/uncond", residual)
        if pass_index == 1 and step >= self.resume_step:
            self._pass1_late[(step, layer)] = grid

    def put_tokens(self, pass_index, step, grid, mask) -> None:
        if step >= self.resume_step:
            self.store.put(self._tokens_name(pass_index, step, grid), mask)

    def put_injection(self, layer, step, bank) -> None:
        self._put_rows(injection_name(step, layer), quantize_rows(bank, INJECTION_BITS, channel_divisor(bank)))

    def finish(self) -> None:
        """Keep, of pass 1 from S // 10 on, only the rows of tokens that pass 2 does not share."""
        store = self.store
        for (step, layer), grid in self._pass1_late.items():
            if self._tokens_name(2, step, grid) not in store:
                continue  # one pass only (no injection): pass 1 stays whole
            m1 = store.get(self._tokens_name(1, step, grid)).reshape(-1)
            m2 = store.get(self._tokens_name(2, step, grid)).reshape(-1)
            whole_base, own_base = self._pair_name("p1", step, layer), self._pair_name("p1x", step, layer)
            rows = (~m2[m1]).nonzero().squeeze(1).to(store.get(whole_base + "/cond/q").device)
            for half, bits in zip(("cond", "uncond"), self._bits_at(self.config, 1, step)):
                whole = self._get_rows(f"{whole_base}/{half}", bits, None)
                self._put_rows(f"{own_base}/{half}", take_rows(whole, rows))
                for suffix in _ROW_PARTS:
                    store.drop(f"{whole_base}/{half}/{suffix}")
        self._pass1_late.clear()

    # --- replay ---
    def _halves(self, base: str, bits: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        cond = self._get_rows(base + "/cond", bits[0], device)
        residual = self._get_rows(base + "/uncond", bits[1], device)
        return dequantize_halves(residual, cond, torch.float32)

    def _pass1_from_pass2(self, step: int, layer: str, grid: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 1's rows at a step from S // 10 on: pass 2's where it has the token, else its own."""
        shared = self._halves(self._pair_name("p2", step, layer), PAIR_BITS, device)
        extra = self._halves(self._pair_name("p1x", step, layer), PAIR_BITS, device)
        if self._orders is None or self._orders[0] != device:
            self._orders = (device, {key: to_device(o, device) for key, o in self._late_orders().items()})
        order = self._orders[1][(step, grid)]
        return tuple(torch.cat([s, e]).index_select(0, order) for s, e in zip(shared, extra))

    def _late_orders(self) -> dict[tuple[int, str], torch.Tensor]:
        """Pass 1's rows at every step from S // 10 on, as indices into [pass 2's rows, its own
        rows], worked out on the host from the token masks once per cache (finding them on the
        device at every step would make the denoising loop wait for it)."""
        names = lambda p, steps, grid: [self._tokens_name(p, s, grid) for s in steps]  # noqa: E731
        orders = {}
        for grid in GRIDS:
            steps = [s for s in range(self.resume_step, self.config.num_inference_steps)
                     if self._tokens_name(1, s, grid) in self.store and self._tokens_name(2, s, grid) in self.store]
            if not steps:
                continue
            m1, m2 = (torch.stack([self.store.get(n).reshape(-1) for n in names(p, steps, grid)]).cpu() for p in (1, 2))
            from_pass2 = m2.cumsum(1) - 1
            own = (m1 & ~m2).cumsum(1) - 1 + m2.sum(1, keepdim=True)
            for step, order, rows in zip(steps, torch.where(m2, from_pass2, own), m1):
                orders[(step, grid)] = order[rows]
        return orders

    def shared_inputs(self, pass_index, layer, step, half, grid, device, dtype) -> torch.Tensor:
        key = (pass_index, layer, step)
        if self._memo is None or self._memo[0] != key:
            if pass_index == 1 and step >= self.resume_step and \
                    self._pair_name("p1x", step, layer) + "/cond/q" in self.store:
                pair = self._pass1_from_pass2(step, layer, grid, device)
            else:
                bits = self._bits_at(self.config, pass_index, step)
                pair = self._halves(self._pair_name(f"p{pass_index}", step, layer), bits, device)
            self._memo = (key, pair)
        return self._memo[1][half].to(dtype)

    def injection(self, layer, step, device, dtype) -> torch.Tensor:
        return dequantize_rows(self._get_rows(injection_name(step, layer), INJECTION_BITS, device), dtype)

    # --- schema ---
    @classmethod
    def _shared_specs(cls, config, layer, step, dtype, resumed) -> list[TensorSpec]:
        late = step >= config.injection_steps().start
        blocks = []  # (label, bits, what the rows count)
        if 2 in passes_at(config, step, resumed):
            if late:  # pass 1 keeps only its own tokens beside pass 2's
                blocks.append(("p1x", PAIR_BITS, PASS1_ONLY_ROWS))
            blocks.append(("p2", PAIR_BITS, SHARED_ROWS))
        if not (late and config.two_passes):
            blocks.append(("p1", cls._bits_at(config, 1, step), SHARED_ROWS))
        specs = []
        for label, bits, rows in blocks:
            base = cls._pair_name(label, step, layer.name)
            for half, b in zip(("cond", "uncond"), bits):
                specs += _rows_specs(f"{base}/{half}", layer.dim, b, "shared", rows, layer.grid, base)
        return specs

    @classmethod
    def _injection_specs(cls, name, dim, dtype) -> list[TensorSpec]:
        return _rows_specs(name, dim, INJECTION_BITS, "injection", SUBJECT_ROWS, "fine", name)

    @classmethod
    def _token_specs(cls, config, n_anchors, grids) -> list[TensorSpec]:
        if not config.sdsa:
            return []
        start = config.injection_steps().start
        return [
            TensorSpec(cls._tokens_name(p, step, grid), torch.bool, (n_anchors, grids.tokens(grid)), "token_masks",
                       grid=grid, at=(p, step))
            for step in range(max(start, 1), config.num_inference_steps)
            for p in ((1, 2) if config.two_passes else (1,))
            for grid in GRIDS
        ]
