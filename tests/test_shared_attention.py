"""SDSA at one real `up` self-attention layer: the anchors' dropout masks gate what is shared."""

import pytest
import torch

from consistory import ConsiStoryConfig
from consistory.method.anchors import LiveAnchors
from consistory.method.grids import Grids
from consistory.method.processors import SelfAttentionProcessor
from consistory.method.run_state import RunState


@pytest.fixture(scope="module")
def layer(tiny_pipe):
    unet = tiny_pipe.sdxl.unet
    name = next(n for n in unet.attn_processors if n.startswith("up_blocks.1") and n.endswith("attn1.processor"))
    module = unet.get_submodule(name.removesuffix(".processor"))
    return name.removesuffix(".processor"), module


def _state(grids, n_images, dropout):
    state = RunState(
        # No dropout: the hand-made masks below are exactly what the anchors share.
        config=ConsiStoryConfig(height=64, width=64, mask_dropout=0.0),
        grids=grids,
        n_images=n_images,
        token_weights=torch.zeros(n_images, 1, 77),
        present=torch.ones(n_images, 1, dtype=torch.bool),
        anchors=LiveAnchors(2, n_images),
        seeds=list(range(n_images)),
        dift_step=0,
    )
    state.step, state.sdsa_active = 1, True
    state.dropout_masks = {"fine": dropout, "coarse": torch.zeros(n_images, grids.tokens("coarse"), dtype=torch.bool)}
    return state


def test_masks_gate_attention(layer):
    name, attn = layer
    grids = Grids.for_image(64, 64)  # fine grid 4 x 4
    n = grids.tokens("fine")
    dropout = torch.zeros(3, n, dtype=torch.bool)
    dropout[0, :5] = True  # anchor 0 shares tokens 0..4
    dropout[1, 8:10] = True  # anchor 1 shares tokens 8, 9
    processor = SelfAttentionProcessor(name, "up", _state(grids, 3, dropout), original=None)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, n, attn.to_q.in_features, generator=g)  # rows: 3 uncond, 3 cond

    def image2(h):
        with torch.no_grad():
            out = processor(attn, h)
        return out[[2, 5]]  # image 2 (not an anchor), both CFG halves

    base = image2(hidden)
    outside = hidden.clone()
    outside[[0, 3], 5:] += 3.0 * torch.randn(2, n - 5, hidden.shape[-1], generator=g)
    assert torch.allclose(image2(outside), base, atol=1e-6)

    inside = hidden.clone()
    inside[[0, 3], :5] += 3.0 * torch.randn(2, 5, hidden.shape[-1], generator=g)
    assert (image2(inside) - base).abs().max() > 1e-3


def test_an_anchor_does_not_attend_to_its_own_shared_copy(layer):
    name, attn = layer
    grids = Grids.for_image(64, 64)
    n = grids.tokens("fine")
    dropout = torch.ones(2, n, dtype=torch.bool)
    processor = SelfAttentionProcessor(name, "up", _state(grids, 2, dropout), original=None)
    hidden = torch.randn(4, n, attn.to_q.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        shared = processor(attn, hidden)
        changed = hidden.clone()
        changed[[1, 3]] += 1.0  # anchor 1 changes: anchor 0 must see it (it attends to anchor 1)
        assert (processor(attn, changed)[[0, 2]] - shared[[0, 2]]).abs().max() > 1e-3
        # With anchor 1 sharing nothing, anchor 0 sees only itself: plain self-attention.
        processor.state.dropout_masks["fine"][1] = False
        processor.state.step = 2  # masks are fixed within a step; a new step picks the change up
        alone = processor(attn, hidden)[[0, 2]]
        processor.state.sdsa_active = False
        processor.state.inject_active = False
        plain = SelfAttentionProcessor(name, "up", processor.state, original=attn.processor)(attn, hidden)[[0, 2]]
    assert torch.allclose(alone, plain, atol=1e-5)
