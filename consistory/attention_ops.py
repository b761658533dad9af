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


def shared_token_index(dropout_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (into A * N) of the anchors' tokens inside their dropout masks (A, N), anchor
    by anchor in row-major order, and the anchor that owns each. Computed once per step and grid
    (it is the only host sync SDSA needs), then reused by every layer of that grid."""
    index = dropout_masks.reshape(-1).nonzero().squeeze(1)
    return index, torch.div(index, dropout_masks.shape[1], rounding_mode="floor")


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
    hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDSA: each row attends to all of its own tokens plus the shared tokens.

    q, k, v (R, N, C); k_shared, v_shared (M, C). `hidden` (A, M) bool marks, for the first A
    rows (the anchors of a batch), the shared tokens they must not see (their own); the other
    rows see every shared token. One softmax over the union of tokens, per head.
    """
    r, n, _ = k.shape
    m = k_shared.shape[0]
    if m == 0:
        return attention(q, k, v, heads)
    keys = torch.cat([k, k_shared.to(k.dtype).expand(r, m, -1)], dim=1)
    values = torch.cat([v, v_shared.to(v.dtype).expand(r, m, -1)], dim=1)
    if hidden is None:
        return attention(q, keys, values, heads)
    a = hidden.shape[0]
    # Only the anchor rows need a mask; the other rows keep the unmasked kernel, the fast one.
    own = torch.ones(a, n, dtype=torch.bool, device=k.device)
    mask = torch.cat([own, ~hidden], dim=1)[:, None, None, :]  # (A, 1, 1, N + M)
    parts = [attention(q[:a], keys[:a], values[:a], heads, mask)]
    if r > a:
        parts.append(attention(q[a:], keys[a:], values[a:], heads))
    return torch.cat(parts)


def mix_queries(q: torch.Tensor, q_vanilla: torch.Tensor, strength: float) -> torch.Tensor:
    """Vanilla query mixing: s * q_vanilla + (1 - s) * q."""
    return strength * q_vanilla + (1.0 - strength) * q
