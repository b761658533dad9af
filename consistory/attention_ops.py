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


def gather_shared_tokens(
    k: torch.Tensor, v: torch.Tensor, anchor_rows: torch.Tensor, dropout_masks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys/values of the anchors' tokens inside their dropout masks.

    k, v (R, N, C); anchor_rows (A,) row indices; dropout_masks (A, N) bool.
    Returns k_shared, v_shared (M, C) (anchor by anchor, row-major) and owner (M,), the anchor
    index each token came from.
    """
    masks = dropout_masks.to(k.device)
    owner = torch.arange(masks.shape[0], device=k.device)[:, None].expand_as(masks)[masks]
    return k[anchor_rows][masks], v[anchor_rows][masks], owner


def shared_visibility(owner: torch.Tensor, row_anchor: torch.Tensor) -> torch.Tensor | None:
    """(R, M) bool: which shared tokens each row may attend to (never its own, as an anchor).

    row_anchor (R,) is the anchor index of each row, -1 for non-anchors. None when every row
    sees every token (no mask needed).
    """
    if bool((row_anchor < 0).all()):
        return None
    return owner[None, :] != row_anchor[:, None]


def shared_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_shared: torch.Tensor,
    v_shared: torch.Tensor,
    visible: torch.Tensor | None,
    heads: int,
) -> torch.Tensor:
    """SDSA: each row attends to all of its own tokens plus the shared tokens it may see.

    q, k, v (R, N, C); k_shared, v_shared (M, C); visible (R, M) bool or None (all visible).
    One softmax over the union of tokens, per head.
    """
    r, n, _ = k.shape
    m = k_shared.shape[0]
    if m == 0:
        return attention(q, k, v, heads)
    keys = torch.cat([k, k_shared.to(k.dtype).expand(r, m, -1)], dim=1)
    values = torch.cat([v, v_shared.to(v.dtype).expand(r, m, -1)], dim=1)
    if visible is None:
        return attention(q, keys, values, heads)
    # Only anchor rows need a mask (to hide their own shared copy); the other rows keep the
    # unmasked kernel, which is the fast one on GPUs.
    visible = visible.to(k.device)
    masked = ~visible.all(dim=1)
    out = torch.empty_like(q)
    if bool((~masked).any()):
        free = ~masked
        out[free] = attention(q[free], keys[free], values[free], heads)
    if bool(masked.any()):
        own = torch.ones(int(masked.sum()), n, dtype=torch.bool, device=k.device)
        mask = torch.cat([own, visible[masked]], dim=1)[:, None, None, :]  # (rows, 1, 1, N + M)
        out[masked] = attention(q[masked], keys[masked], values[masked], heads, mask)
    return out


def mix_queries(q: torch.Tensor, q_vanilla: torch.Tensor, strength: float) -> torch.Tensor:
    """Vanilla query mixing: s * q_vanilla + (1 - s) * q."""
    return strength * q_vanilla + (1.0 - strength) * q
