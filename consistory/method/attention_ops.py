"""Tensor pieces of the attention processors, as small pure functions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(R, N, C) -> (R, heads, N, C // heads)."""
    r, n, c = x.shape
    return x.view(r, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(R, heads, N, d) -> (R, N, heads * d)."""
    r, h, n, d = x.shape
    return x.transpose(1, 2).reshape(r, n, h * d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask=None) -> torch.Tensor:
    """Plain multi-head softmax(QK^T / sqrt(d)) V on (R, N, C) projections -> (R, N, C); `mask`
    (R, 1, 1, T) bool, True where a key may be seen."""
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), attn_mask=mask)
    return merge_heads(out).to(q.dtype)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention probabilities (R, heads, N, T), computed in float32."""
    qh, kh = split_heads(q, heads).float(), split_heads(k, heads).float()
    scores = qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5
    return scores.softmax(dim=-1)


@dataclass
class SharedTokens:
    """The anchors' tokens that the rows of one forward may attend to, for both CFG halves.

    keys, values (2, M, C): [unconditional, conditional] half. `visible` (B, M) bool says which
    shared token each image of the batch sees (None: every image sees every token). A fixed
    token budget with padding masked out keeps M known on the host without reading anything
    back from the device.
    """

    keys: torch.Tensor
    values: torch.Tensor
    visible: torch.Tensor | None = None


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of x (R, N, C) flattened to (R * N, C) -> (M, C)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, index)


def shared_self_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shared: SharedTokens, heads: int
) -> torch.Tensor:
    """SDSA: each row attends to all of its own tokens plus the shared tokens it may see.

    q, k, v (2B, N, C), rows [unconditional B, conditional B]; each half sees the shared tokens
    of its own half. One softmax over the union of tokens, per head, in one call for all rows;
    masked keys contribute exactly nothing. Without a mask (every shared token visible to every
    row) the fastest kernel applies.
    """
    r, n, c = k.shape
    b, m = r // 2, shared.keys.shape[1]
    if m == 0:
        return attention(q, k, v, heads)

    def per_row(x: torch.Tensor) -> torch.Tensor:  # (2, M, C) -> (2B, M, C), each half's own tokens
        return x.to(k.dtype)[:, None].expand(2, b, m, c).reshape(r, m, c)

    keys = torch.cat([k, per_row(shared.keys)], dim=1)
    values = torch.cat([v, per_row(shared.values)], dim=1)
    mask = None
    if shared.visible is not None:  # (B, M) -> (2B, 1, 1, N + M): own tokens always visible
        mask = F.pad(shared.visible, (n, 0), value=True).repeat(2, 1)[:, None, None, :]
    return attention(q, keys, values, heads, mask)


def mix_queries(q: torch.Tensor, q_vanilla: torch.Tensor, strength: float) -> torch.Tensor:
    """Vanilla query mixing: s * q_vanilla + (1 - s) * q."""
    return strength * q_vanilla + (1.0 - strength) * q
