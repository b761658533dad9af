"""DIFT features as published: with FreeU on, the first `up` block's output carries FreeU's
backbone scaling (its first C/2 channels times b2) before smoothing."""

import pytest
import torch
from story_prompts import ANCHORS, CONFIG, SUBJECTS

from consistory.method.correspondence import smooth_features
from consistory.method.denoise import nearest_step


def _anchors_with_block_outputs(pipe, config):
    """create_anchors, plus the first `up` block's output of every UNet forward of pass 1, both
    as a copy taken in the hook and as the tensor itself (which later code may change in place)."""
    copies, tensors = [], []

    def record(module, inputs, output):
        copies.append(output.detach().clone())
        tensors.append(output)

    handle = pipe.sdxl.unet.up_blocks[0].register_forward_hook(record)
    try:
        made = pipe.create_anchors(ANCHORS, SUBJECTS, seed=3, config=config, output_type="latent")
    finally:
        handle.remove()
    scheduler = type(pipe.sdxl.scheduler).from_config(pipe.sdxl.scheduler.config)
    scheduler.set_timesteps(config.num_inference_steps)
    step = nearest_step(scheduler.timesteps, config.dift_timestep)
    assert config.query_mix_strength(step) is None  # no fused vanilla rows at the DIFT step
    b = len(ANCHORS)
    # Pass 1's forwards come first, one per step: the DIFT step's conditional half.
    return made.cache, copies[step][b:], tensors[step][b:]


def _smooth(features, config):
    return smooth_features(features, config.dift_kernel_size, config.dift_sigma)


def test_dift_with_freeu_carries_the_backbone_scaling_as_published(tiny_pipe):
    config = CONFIG
    assert config.freeu and config.dift_freeu_scaling  # the defaults
    cache, plain, in_place = _anchors_with_block_outputs(tiny_pipe, config)
    half = plain.shape[1] // 2
    scaled = plain.clone()
    scaled[:, :half] *= config.freeu_b2
    assert torch.allclose(cache.dift, _smooth(scaled, config), atol=1e-6)
    # The same tensor as the published code sees it: diffusers' FreeU scaled it in place.
    assert torch.allclose(cache.dift, _smooth(in_place, config), atol=1e-6)
    assert not torch.allclose(cache.dift, _smooth(plain, config), atol=1e-4)


@pytest.mark.parametrize("change", [{"freeu": False}, {"dift_freeu_scaling": False}])
def test_dift_is_the_plain_block_output_without_freeu_or_the_setting(tiny_pipe, change):
    config = CONFIG.replace(**change)
    cache, plain, _ = _anchors_with_block_outputs(tiny_pipe, config)
    assert torch.allclose(cache.dift, _smooth(plain, config), atol=1e-6)
