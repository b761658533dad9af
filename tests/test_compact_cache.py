"""The compact anchor cache: a few bits per value, close to the exact cache's images, its size
counted from the layer shapes, and its bytes read in place."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from story_prompts import ANCHORS, CONFIG, NEW, SUBJECTS

from consistory import AnchorCache, AnchorCacheError, ConsiStoryPipeline, vanilla_config
from consistory.cache.layout import read_buffers, serialize
from consistory.cache.size import MaskStats, count_cache_bytes
from consistory.cache.quantization import (
    channel_divisor,
    dequantize_halves,
    dequantize_rows,
    pack_bits,
    quantize_halves,
    quantize_rows,
    unpack_bits,
)
from consistory.seeds import initial_latents

# Measured 0.27 on tiny with these settings (0.04 on the small preset, see README): a codec
# that mixes up halves, passes or token rows lands near 1 or above.
TINY_DEVIATION_BOUND = 0.5


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
def test_bit_packing_round_trips(bits):
    codes = torch.randint(0, 2**bits, (5, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.shape == (5, 48 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 48), codes.long())


def test_quantization_error_is_within_half_a_step():
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 5, 64)
    for bits in (3, 5, 8):
        rows = quantize_rows(x, bits, channel_divisor(x))
        step = rows.token_scale[:, None] * rows.channel_scale[None, :]
        assert ((dequantize_rows(rows) - x).abs() <= step / 2 + 1e-5).all()


def test_codec_is_invariant_to_moving_a_channel_factor_into_the_weights():
    # A LayerNorm gain of 50 on a channel, undone by the projection's column: the function is the
    # same, and so is the coded error seen through the weights (what planted outliers test).
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(30, 64, generator=g), torch.rand(64, generator=g) + 0.5
    scale = torch.ones(64)
    scale[[3, 17]] = 50.0
    plain = quantize_halves(x * 0.9, x, 5, 3, weight)
    planted = quantize_halves(x * 0.9 * scale, x * scale, 5, 3, weight / scale)
    for a, b in zip(dequantize_halves(*plain, torch.float32), dequantize_halves(*planted, torch.float32)):
        assert torch.allclose(a * scale, b, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def caches(tiny_pipe):
    exact = tiny_pipe.create_anchors(ANCHORS, SUBJECTS, seed=3, config=CONFIG, output_type="np")
    compact = tiny_pipe.create_anchors(ANCHORS, SUBJECTS, seed=3, config=CONFIG, output_type="np", cache_codec="compact")
    return exact, compact


def test_compact_anchors_are_the_same_images_and_the_cache_is_smaller(caches):
    exact, compact = caches
    assert np.array_equal(exact.images, compact.images)  # the codec only changes what is stored
    assert compact.cache.codec == "compact"
    assert compact.cache.nbytes * 4 < exact.cache.nbytes
    codes = [t for k, t in compact.cache.tensors.items() if k.startswith(("shared/", "inject/")) and k.endswith("/q")]
    assert codes and all(t.dtype == torch.uint8 for t in codes)


def test_compact_new_images_stay_close_to_exact_ones(tiny_pipe, caches):
    exact, compact = caches
    latents = initial_latents([5, 6, 7], (4, 8, 12), torch.float32, "cpu")
    a = tiny_pipe.generate_from_anchors(exact.cache, NEW, latents=latents, output_type="np").images
    b = tiny_pipe.generate_from_anchors(compact.cache, NEW, latents=latents, output_type="np").images
    plain = tiny_pipe.generate_story(
        NEW, SUBJECTS, config=vanilla_config(num_inference_steps=12, height=64, width=96, freeu=True),
        latents=latents, output_type="np",
    ).images
    method_effect = np.abs(a - plain).mean()
    assert method_effect > 0
    assert np.abs(b - a).mean() / method_effect <= TINY_DEVIATION_BOUND


def test_compact_cache_round_trips_through_files_bytes_and_chunks(tiny_pipe, caches, tmp_path):
    _, compact = caches
    reference = tiny_pipe.generate_from_anchors(compact.cache, NEW[:1], output_type="np").images
    path = compact.cache.save(tmp_path / "dog.cache")
    with safe_open(str(path), framework="pt") as f:  # still plain safetensors
        assert set(f.keys()) == set(compact.cache.tensors)
    buffers = compact.cache.to_buffers(chunk_bytes=4096)
    largest = max(t.numel() * t.element_size() for t in compact.cache.tensors.values())
    assert len(buffers.chunks) > 10
    assert all(len(c) <= max(4096, largest) for c in buffers.chunks)  # a larger tensor gets a chunk alone
    for cache in (AnchorCache.load(path), AnchorCache.from_bytes(compact.cache.to_bytes()),
                  AnchorCache.from_buffers(buffers.header, buffers.chunks)):
        assert cache.codec == "compact" and cache.nbytes == compact.cache.nbytes
        again = tiny_pipe.generate_from_anchors(cache, NEW[:1], output_type="np").images
        assert np.array_equal(again, reference)


def test_tensors_read_from_chunks_are_views_not_copies(caches):
    _, compact = caches
    buffers = compact.cache.to_buffers(chunk_bytes=8192)
    cache = AnchorCache.from_buffers(buffers.header, buffers.chunks)
    ranges = [(c.ctypes.data, c.ctypes.data + c.nbytes) for c in buffers.chunks]
    for key in list(cache.tensors)[:50]:
        t = cache.tensors[key]
        if t.numel():
            assert any(lo <= t.data_ptr() < hi for lo, hi in ranges), key
            assert torch.equal(t, compact.cache.tensors[key])


def test_chunks_start_aligned_for_every_dtype():
    tensors = {"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(5, dtype=torch.float16),
               "c": torch.ones(7, dtype=torch.float32), "d": torch.ones(2, dtype=torch.bool)}
    buffers = serialize(tensors, {}, chunk_bytes=8)
    _, lazy = read_buffers(buffers.header, buffers.chunks)
    for key, t in tensors.items():
        assert torch.equal(lazy[key], t)
        assert lazy[key].data_ptr() % t.element_size() == 0


@pytest.mark.parametrize("preset,size", [("tiny", 64), ("small", 128)])
@pytest.mark.parametrize("codec", ["exact", "compact"])
def test_byte_count_from_layer_shapes_agrees_with_real_caches(preset, size, codec):
    pipe = ConsiStoryPipeline.from_preset(preset)
    pipe.set_progress_bar_config(disable=True)
    config = CONFIG.replace(num_inference_steps=10, height=size, width=size)
    cache = pipe.create_anchors(ANCHORS, SUBJECTS, seed=1, config=config, output_type="latent", cache_codec=codec).cache
    counted = count_cache_bytes(pipe.sdxl.unet, config, MaskStats.of_cache(cache, pipe.sdxl.unet), codec, dtype_bytes=4)
    assert abs(counted["total"] - cache.nbytes) <= 0.05 * cache.nbytes


def test_a_compact_cache_missing_pass_1s_own_rows_is_refused(tiny_pipe, caches):
    _, compact = caches
    own = next(k for k in compact.cache.tensors if k.startswith("shared/p1x/"))
    tensors = {k: t for k, t in compact.cache.tensors.items() if k != own}
    cache = AnchorCache(compact.cache.subjects, compact.cache.anchor_prompts, compact.cache.seeds, compact.cache.config,
                        compact.cache.model_id, compact.cache.model_fingerprint, compact.cache.dtype, "compact", tensors)
    with pytest.raises(AnchorCacheError, match=f"lacks 1 tensors, e.g. '{own}'"):
        tiny_pipe.generate_from_anchors(cache, NEW[:1])


def test_a_version_1_file_is_refused_with_a_message_to_recreate_it(caches, tmp_path):
    from safetensors.torch import save_file

    exact, _ = caches
    path = tmp_path / "old.cache"
    # A file as format version 1 wrote it: keys and values per layer, version "1".
    save_file({"shared/p1/s1/h0/up_blocks.0.attentions.0.transformer_blocks.0.attn1/k": torch.zeros(2, 64)},
              str(path), metadata={**exact.cache.metadata(), "format_version": "1"})
    with pytest.raises(AnchorCacheError, match="version 1 .*create the anchors again"):
        AnchorCache.load(path)


def test_unknown_codec_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="cache_codec"):
        tiny_pipe.create_anchors(ANCHORS, SUBJECTS, cache_codec="zip")
