"""Attention processors that carry the method: SDSA, query mixing, feature injection, and the
recording of cross-attention maps for subject localization.

A processor owns no weights: it reads `to_q/to_k/to_v/to_out` off the `attn` module it is handed,
and falls back to the layer's original processor whenever the method has nothing to do there,
so with every mechanism off the UNet computes exactly what diffusers computes.
"""

from __future__ import annotations

import torch

from .attention_ops import attention, attention_probs, mix_queries, shared_self_attention
from .correspondence import inject_features
from .run_state import RunState
from .subject_masks import subject_maps


def _require_plain(name: str, attn, hidden_states: torch.Tensor, attention_mask) -> None:
    # SDXL's transformer attention: token inputs, no attention mask, no extra norms.
    extras = [n for n in ("spatial_norm", "group_norm", "norm_q", "norm_k") if getattr(attn, n, None) is not None]
    if hidden_states.ndim != 3 or attention_mask is not None or extras:
        raise NotImplementedError(
            f"attention layer {name} is not SDXL-like (token input without mask or extra norms; "
            f"found ndim={hidden_states.ndim}, mask={attention_mask is not None}, norms={extras})"
        )


def _finish(attn, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class SelfAttentionProcessor:
    """Self-attention (attn1) of a `down` or `up` layer."""

    def __init__(self, name: str, part: str, state: RunState, original) -> None:
        self.name, self.part, self.state, self.original = name, part, state, original

    def _active(self, grid: str | None) -> tuple[bool, bool, bool]:
        s = self.state
        in_up = self.part == "up"
        sdsa = in_up and s.sdsa_active and grid is not None
        mix = in_up and s.mix_strength is not None
        inject = s.inject_active and grid == "fine"
        return sdsa, mix, inject

    # Outside any compiled graph: per-step Python state decides what runs (see compiled_unet).
    @torch.compiler.disable
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        s = self.state
        grid = s.grids.name_of(hidden_states.shape[1]) if hidden_states.ndim == 3 else None
        sdsa, mix, inject = self._active(grid)
        if not (sdsa or mix or inject):  # rows are independent here: the original is exact
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        _require_plain(self.name, attn, hidden_states, attention_mask)

        heads, off = attn.heads, s.main_offset
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)  # (R, N, C)
        parts = []
        q_main, k_main, v_main = q[off:], k[off:], v[off:]
        if off:  # the vanilla forward of query mixing: plain attention, queries kept for mixing
            parts.append(attention(q[:off], k[:off], v[:off], heads))
            if mix:
                q_main = mix_queries(q_main, q[:off], s.mix_strength)
        if sdsa:
            shared = s.anchors.shared_tokens(s.at(self.name, grid), attn, hidden_states[off:], k_main, v_main,
                                             s.dropout_masks.get(grid))
            parts.append(shared_self_attention(q_main, k_main, v_main, shared, heads))
        else:
            parts.append(attention(q_main, k_main, v_main, heads))
        out = attn.to_out[1](attn.to_out[0](torch.cat(parts)))

        if inject:
            cond = s.half_rows(1)
            bank = s.anchors.injection_bank(s.at(self.name, grid), out[cond], s.final_masks["fine"])
            out = out.clone()
            out[cond] = inject_features(out[cond], bank, s.plan, s.config.injection_alpha)
        return _finish(attn, out, hidden_states)


class CrossAttentionProcessor:
    """Cross-attention (attn2): records subject maps on the coarse grid (conditional half)."""

    def __init__(self, name: str, state: RunState, original) -> None:
        self.name, self.state, self.original = name, state, original

    @torch.compiler.disable
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        s = self.state
        records = (
            encoder_hidden_states is not None
            and hidden_states.ndim == 3
            and s.grids.name_of(hidden_states.shape[1]) == "coarse"
        )
        if not records:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        _require_plain(self.name, attn, hidden_states, attention_mask)
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        cond = s.half_rows(1)
        probs = attention_probs(q[cond], k[cond], attn.heads)  # (B, heads, N, T)
        s.window.record(self.name, subject_maps(probs, s.token_weights.to(probs.device)))
        out = attn.to_out[1](attn.to_out[0](attention(q, k, v, attn.heads)))
        return _finish(attn, out, hidden_states)


def build_processors(originals: dict, state: RunState) -> dict:
    """Processors for every attention layer of the UNet, by diffusers' processor names."""
    processors = {}
    for name, original in originals.items():
        layer = name.removesuffix(".processor")
        part = {"down_blocks": "down", "up_blocks": "up"}.get(layer.split(".", 1)[0], "mid")
        if layer.endswith("attn2"):
            processors[name] = CrossAttentionProcessor(layer, state, original)
        elif layer.endswith("attn1") and part in ("down", "up"):
            processors[name] = SelfAttentionProcessor(layer, part, state, original)
        else:
            processors[name] = original
    if not any(isinstance(p, SelfAttentionProcessor) and p.part == "up" for p in processors.values()):
        raise ValueError("the UNet has no `up` self-attention layers (attn1); it is not an SDXL-like UNet")
    return processors
