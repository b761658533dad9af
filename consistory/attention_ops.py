"""Tensor pieces of the attention processors, as small pure functions."""

from __future__ import annotations

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
    """Plain multi-head softmax(QK^T / sqrt(d)) V on (R, N, C) projections -> (R, N, C)."""
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), attn_mask=mask)
    return merge_heads(out).to(q.dtype)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention probabilities (R, heads, N, T), computed in float32."""
    qh, kh = split_heads(q, heads).float(), split_heads(k, heads).float()
    scores = qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5
    return scores.softmax(dim=-1)


def shared_token_index(masks: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Flat indices (into A * N) of the anchors' tokens inside their masks (A, N), anchor by
    anchor in row-major order, and each anchor's [start, end) block among them. Computed once
    per step and grid (the only host sync SDSA needs), then reused by every layer of that grid."""
    index = masks.reshape(-1).nonzero().squeeze(1)
    ends = masks.sum(dim=1).cumsum(0).tolist()
    return index, list(zip([0] + ends[:-1], ends))


def gather_shared_tokens(x: torch.Tensor, n_anchors: int, index: torch.Tensor) -> torch.Tensor:
    """The anchors' rows of x (R, N, C) (the first `n_anchors` rows) at flat `index` -> (M, C)."""
    return x[:n_anchors].reshape(-1, x.shape[-1]).index_select(0, index)


def shared_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_shared: torch.Tensor,
    v_shared: torch.Tensor,
    heads: int,
    anchor_blocks: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """SDSA: each row attends to all of its own tokens plus the shared tokens.

    q, k, v (R, N, C); k_shared, v_shared (M, C). `anchor_blocks` gives, for the first A rows
    (the anchors of a batch), the [start, end) block of shared tokens that is their own and that
    they must not see; the other rows see every shared token. One softmax over the union of
    tokens, per head. No attention mask is ever built, so the fastest kernel always applies.
    """
    r = k.shape[0]
    if k_shared.shape[0] == 0:
        return attention(q, k, v, heads)
    blocks = anchor_blocks or []
    parts = []
    for a, (start, end) in enumerate(blocks):
        k_other = torch.cat([k_shared[:start], k_shared[end:]]).to(k.dtype)
        v_other = torch.cat([v_shared[:start], v_shared[end:]]).to(v.dtype)
        keys = torch.cat([k[a : a + 1], k_other[None]], dim=1)
        values = torch.cat([v[a : a + 1], v_other[None]], dim=1)
        parts.append(attention(q[a : a + 1], keys, values, heads))
    a = len(blocks)
    if r > a:
        m = k_shared.shape[0]
        keys = torch.cat([k[a:], k_shared.to(k.dtype).expand(r - a, m, -1)], dim=1)
        values = torch.cat([v[a:], v_shared.to(v.dtype).expand(r - a, m, -1)], dim=1)
        parts.append(attention(q[a:], keys, values, heads))
    return torch.cat(parts)


def mix_queries(q: torch.Tensor, q_vanilla: torch.Tensor, strength: float) -> torch.Tensor:
    """Vanilla query mixing: s * q_vanilla + (1 - s) * q."""
    return strength * q_vanilla + (1.0 - strength) * q
