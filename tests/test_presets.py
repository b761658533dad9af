"""The offline presets are stock SDXL pipelines that build deterministically with no network."""

from __future__ import annotations

import os

# Before diffusers/transformers are imported by this module: any hub access would now fail loudly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from consistory.presets.sdxl import PRESETS, build_preset_sdxl
from consistory.presets.tiny import build_tiny_sdxl
from consistory.presets.tokenizer import COMMON_WORDS, build_local_clip_tokenizer, local_vocab_size


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a shared CPU a busy core turns
    # OpenMP's barrier spinning into a ~100x slowdown (0.07 s -> 11 s per call, measured).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny(one_thread: None) -> StableDiffusionXLPipeline:
    return build_tiny_sdxl(seed=0)


def _run(pipe: StableDiffusionXLPipeline) -> np.ndarray:
    return pipe(
        "A photo of a dog in the park",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_tiny_has_sdxl_topology(tiny: StableDiffusionXLPipeline) -> None:
    unet = tiny.unet
    assert type(unet.down_blocks[0]).__name__ == "DownBlock2D"
    cross_attn_levels = [b for b in unet.down_blocks if getattr(b, "has_cross_attention", False)]
    assert len(cross_attn_levels) == 2
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert unet.config.addition_embed_type == "text_time"
    assert tiny.vae_scale_factor == 8
    assert tiny.text_encoder is not None and tiny.text_encoder_2 is not None
    assert unet.config.cross_attention_dim == (
        tiny.text_encoder.config.hidden_size + tiny.text_encoder_2.config.hidden_size
    )
    assert tiny.tokenizer.model_max_length == 77
    assert tiny.tokenizer_2.model_max_length == 77
    assert tiny.text_encoder.config.vocab_size >= local_vocab_size()


def _state(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    modules = {"unet": pipe.unet, "vae": pipe.vae, "te": pipe.text_encoder, "te2": pipe.text_encoder_2}
    return {f"{m}.{k}": v for m, mod in modules.items() for k, v in mod.state_dict().items()}


def test_same_seed_same_weights_other_seed_differs(tiny: StableDiffusionXLPipeline) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = build_preset_sdxl("tiny", seed=0)
    # Building must not consume the caller's global RNG.
    assert torch.equal(torch.rand(3), expected_next)

    a, b = _state(tiny), _state(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    c = _state(build_preset_sdxl("tiny", seed=1))
    for prefix in ("unet.", "vae.", "te.", "te2."):
        assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith(prefix)), prefix


def test_stock_pipeline_call(tiny: StableDiffusionXLPipeline) -> None:
    images = _run(tiny)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_stock_pipeline_call_with_freeu() -> None:
    pipe = build_tiny_sdxl(seed=0)
    plain = _run(pipe)
    pipe.enable_freeu(s1=0.6, s2=0.4, b1=1.1, b2=1.2)
    images = _run(pipe)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    # FreeU is actually active, not silently ignored by the tiny up blocks.
    assert not np.array_equal(images, plain)


def test_tokenizer_single_and_multi_piece_words() -> None:
    tok = build_local_clip_tokenizer()
    ids = tok("A photo of a dog in the park").input_ids
    words = "a photo of a dog in the park".split()
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in words]

    for word in ("hedgehog", "caesar", "salad", "wizard", "polar", "bear", "astronaut", "teddy"):
        assert len(tok(word).input_ids) == 3, word  # bos, word, eos
    assert all(len(tok(w).input_ids) == 3 for w in COMMON_WORDS)

    assert len(tok("hedgehogzz").input_ids) - 2 > 1
    assert max(tok("zqxj 123 ünïcode, hedgehogzz!").input_ids) < local_vocab_size()


def test_tokenizer_padding_matches_sdxl() -> None:
    first, second = build_local_clip_tokenizer(), build_local_clip_tokenizer(pad_token="!")
    padded = first("a dog", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == first.eos_token_id
    assert second("a dog", padding="max_length", max_length=77).input_ids[-1] == second.convert_tokens_to_ids("!")


def test_unknown_preset_raises() -> None:
    with pytest.raises(ValueError, match="tiny"):
        build_preset_sdxl("huge")
    assert PRESETS == ("tiny", "small", "full")


def test_hub_is_offline_while_testing() -> None:
    import huggingface_hub.constants

    # The presets above were built with this set, so none of them needed the network.
    assert huggingface_hub.constants.HF_HUB_OFFLINE
