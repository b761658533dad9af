"""Quantization of anchor-cache activations: rows of tokens in a few bits, with scales.

A block of rows x (M, C) is stored as
    codes (M, C * bits / 8) uint8   bit-packed signed integers, |q| <= 2 ** (bits - 1) - 1
    token_scale (M,) float32        each row's step size (row absmax / levels)
    channel_scale (C,) float32      a per-channel divisor applied before quantizing
and decoded as  x = q * token_scale[:, None] * channel_scale[None, :].

The channel divisor is s_c = sqrt(max_t |x_tc w_c|) / w_c, where w_c is the channel's weight in
what consumes x (for a self-attention input: the norm of column c of [W_k; W_v]). Dividing by w_c
makes the codec invariant to moving a per-channel factor between the activation and the weights
that read it (a LayerNorm gain against the projection's columns: where trained models carry
their outlier channels), and the square-root smoothing between channels and tokens follows
SmoothQuant's migration strength 0.5. Everything is plain tensor arithmetic, so encoding and
decoding run on whatever device the rows are on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_TINY = 1e-12


def levels(bits: int) -> int:
    """Largest code magnitude of a signed `bits`-bit symmetric quantizer."""
    return 2 ** (bits - 1) - 1


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(M, C) codes in [0, 2 ** bits) as uint8 -> (M, C * bits / 8) uint8, little-endian within
    each group of 8 codes. C must be a multiple of 8."""
    m, c = codes.shape
    if bits == 8:
        return codes.to(torch.uint8)
    groups = codes.to(torch.int64).reshape(m, c // 8, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (groups << shifts).sum(dim=-1)  # (M, C/8), 8 * bits <= 64 bits
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((word[..., None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(m, c // 8 * bits)


def unpack_bits(packed: torch.Tensor, bits: int, channels: int) -> torch.Tensor:
    """Inverse of `pack_bits`: (M, C * bits / 8) uint8 -> (M, C) int64 codes."""
    m = packed.shape[0]
    if bits == 8:
        return packed.to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (packed.to(torch.int64).reshape(m, channels // 8, bits) << byte_shifts).sum(dim=-1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    return ((word[..., None] >> shifts) & (2**bits - 1)).reshape(m, channels)


def channel_divisor(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(C,) float32 divisor s_c = sqrt(max_t |x_tc w_c|) / w_c (w = 1 when no weights are given)."""
    x = x.float()
    w = torch.ones(x.shape[1], device=x.device) if weight is None else weight.float().to(x.device).clamp_min(_TINY)
    if x.shape[0] == 0:
        return 1.0 / w
    return (x.abs() * w).amax(dim=0).clamp_min(_TINY).sqrt() / w


@dataclass
class QuantizedRows:
    codes: torch.Tensor  # (M, C * bits / 8) uint8
    token_scale: torch.Tensor  # (M,) float32
    channel_scale: torch.Tensor  # (C,) float32
    bits: int

    @property
    def channels(self) -> int:
        return self.channel_scale.shape[0]


def quantize_rows(x: torch.Tensor, bits: int, channel_scale: torch.Tensor) -> QuantizedRows:
    """Symmetric per-row quantization of x / channel_scale to `bits` bits."""
    if x.shape[1] % 8:
        raise ValueError(f"compact anchor caches need a channel count divisible by 8 (got {x.shape[1]})")
    y = x.float() / channel_scale
    top = levels(bits)
    token_scale = (y.abs().amax(dim=1) / top).clamp_min(_TINY) if y.shape[0] else y.new_zeros(0)
    q = torch.round(y / token_scale[:, None]).clamp_(-top, top)
    codes = (q + 2 ** (bits - 1)).to(torch.uint8)
    return QuantizedRows(pack_bits(codes, bits), token_scale, channel_scale.float(), bits)


def dequantize_rows(rows: QuantizedRows, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_bits(rows.codes, rows.bits, rows.channels) - 2 ** (rows.bits - 1)
    return (q.float() * rows.token_scale.float()[:, None] * rows.channel_scale.float()[None, :]).to(dtype)


def take_rows(rows: QuantizedRows, index: torch.Tensor) -> QuantizedRows:
    """A subset of rows (each row decodes on its own: codes and token scale)."""
    return QuantizedRows(rows.codes[index], rows.token_scale[index], rows.channel_scale, rows.bits)


# --- the two CFG halves of one layer, step and pass -------------------------------------------
# The unconditional half differs from the conditional half at the same tokens only by the text's
# cross-attention, so it is stored as a residual against the *decoded* conditional half (closed
# loop: the residual also carries the conditional half's quantization error).


def quantize_halves(
    x_uncond: torch.Tensor, x_cond: torch.Tensor, bits_cond: int, bits_residual: int, weight: torch.Tensor | None
) -> tuple[QuantizedRows, QuantizedRows]:
    cond = quantize_rows(x_cond, bits_cond, channel_divisor(x_cond, weight))
    residual = x_uncond.float() - dequantize_rows(cond)
    return quantize_rows(residual, bits_residual, channel_divisor(residual, weight)), cond


def dequantize_halves(
    residual: QuantizedRows, cond: QuantizedRows, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    x_cond = dequantize_rows(cond)
    return (x_cond + dequantize_rows(residual)).to(dtype), x_cond.to(dtype)


def packed_bytes(rows: int, channels: int, bits: int) -> int:
    """Bytes of one `QuantizedRows` block (codes, token scales, channel scales)."""
    return rows * channels * bits // 8 + 4 * rows + 4 * channels
