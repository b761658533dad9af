"""One-batch stories on the tiny preset, end to end through diffusers' SDXL."""

import numpy as np
import pytest
import torch
from story_prompts import ANCHORS, CONFIG, NEW, SUBJECTS

from consistory import ConsiStoryConfig, vanilla_config
from consistory.seeds import initial_latents

PROMPTS = ANCHORS + NEW
SWITCHES = ("sdsa", "query_mixing", "feature_injection", "freeu")


def _story(pipe, config=CONFIG, prompts=PROMPTS, subjects=SUBJECTS, **kw):
    return pipe.generate_story(prompts, subjects, seed=3, config=config, output_type="np", **kw)


@pytest.fixture(scope="module")
def full_story(tiny_pipe):
    return _story(tiny_pipe)


def test_all_mechanisms_off_equals_diffusers_sdxl(tiny_pipe):
    config = vanilla_config(num_inference_steps=4, height=64, width=96)
    latents = initial_latents([0, 1, 2], (4, 8, 12), torch.float32, "cpu")
    ours = tiny_pipe.generate_story(PROMPTS[:3], SUBJECTS, config=config, latents=latents, output_type="np")
    theirs = tiny_pipe.sdxl(
        PROMPTS[:3], num_inference_steps=4, height=64, width=96, guidance_scale=config.guidance_scale,
        latents=latents.clone(), output_type="np",
    ).images
    assert ours.images.shape == theirs.shape == (3, 64, 96, 3)
    assert np.abs(ours.images - theirs).max() <= 1e-4


def test_full_method_output(full_story):
    assert full_story.images.shape == (5, 64, 96, 3)
    assert full_story.images.min() >= 0.0 and full_story.images.max() <= 1.0
    assert full_story.seeds == [3, 4, 5, 6, 7]
    assert len(full_story.subject_masks) == 5
    assert full_story.subject_masks[0].shape == (2, 3) and full_story.subject_masks[0].dtype == bool
    assert {"pass1_s", "pass2_s", "total_s"} <= set(full_story.timings)


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_mechanism_changes_the_images(tiny_pipe, full_story, switch):
    # Reruns agree to ~1e-6 (see test_same_seed_same_images); a mechanism must move the images
    # far beyond that. Query mixing acts on one step only at 12 steps, so its effect is smallest.
    without = _story(tiny_pipe, CONFIG.replace(**{switch: False}))
    assert np.abs(without.images - full_story.images).max() > 1e-4


@pytest.mark.parametrize("switch", ["sdsa", "feature_injection", "freeu"])
def test_each_mechanism_alone_changes_plain_sdxl(tiny_pipe, switch):
    plain = _story(tiny_pipe, vanilla_config(num_inference_steps=12, height=64, width=96))
    alone = _story(tiny_pipe, vanilla_config(num_inference_steps=12, height=64, width=96, **{switch: True}))
    assert np.abs(alone.images - plain.images).max() > 1e-3


def test_same_seed_same_images(tiny_pipe, full_story):
    assert np.abs(_story(tiny_pipe).images - full_story.images).max() <= 1e-6


def test_masks_of_an_image_do_not_depend_on_the_rest_of_its_batch(tiny_pipe):
    small = tiny_pipe.generate_story(PROMPTS[:3], SUBJECTS, seed=3, config=CONFIG, output_type="np")
    large = tiny_pipe.generate_story(PROMPTS, SUBJECTS, seed=3, config=CONFIG, output_type="np")
    for a, b in zip(small.subject_masks, large.subject_masks[:3]):
        assert np.array_equal(a, b)
    assert np.abs(small.images - large.images[:3]).max() <= 1e-4


def test_two_subjects_and_multi_token_phrases(tiny_pipe):
    prompts = [
        "a zorblax hedgehogzz wearing a wizard hat",
        "the hat of an old wizard on a zorblax hedgehogzz in the snow",
        "a zorblax hedgehogzz reading a book",
    ]
    out = tiny_pipe.generate_story(
        prompts, ["zorblax hedgehogzz", "wizard hat"], seed=1, config=CONFIG.replace(height=96, width=64), output_type="pil"
    )
    assert len(out.images) == 3 and out.images[0].size == (64, 96)


def test_a_prompt_without_the_subject_names_the_prompt(tiny_pipe):
    with pytest.raises(ValueError, match="a cat on the sofa"):
        tiny_pipe.generate_story([ANCHORS[0], "a cat on the sofa"], SUBJECTS, config=CONFIG)


def test_more_anchors_than_prompts_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="n_anchors is 2 but only 1 prompt"):
        tiny_pipe.generate_story(ANCHORS[:1], SUBJECTS, config=CONFIG)  # CONFIG has the default 2 anchors


def test_bad_latents_and_config_are_rejected(tiny_pipe):
    with pytest.raises(ValueError, match="latents must have shape"):
        tiny_pipe.generate_story(ANCHORS, SUBJECTS, config=CONFIG, latents=torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="multiple of 8"):
        ConsiStoryConfig(height=100)


def test_processors_and_freeu_are_restored_even_on_error(tiny_pipe):
    unet = tiny_pipe.sdxl.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    calls = []

    def fail_on_third_forward(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("planted failure")

    handle = unet.register_forward_hook(fail_on_third_forward)
    try:
        with pytest.raises(RuntimeError, match="planted failure"):
            _story(tiny_pipe)
    finally:
        handle.remove()
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert all(getattr(block, "b1", None) is None for block in unet.up_blocks)
    assert not unet.up_blocks[0]._forward_hooks


def test_a_wrapped_pipeline_keeps_its_own_scheduler(tiny_pipe):
    from diffusers import EulerDiscreteScheduler

    from consistory import ConsiStoryPipeline

    sdxl = tiny_pipe.sdxl
    euler = EulerDiscreteScheduler.from_config(sdxl.scheduler.config)
    ddim = sdxl.scheduler
    try:
        sdxl.scheduler = euler  # init_noise_sigma > 1: the initial latents must be scaled
        wrapped = ConsiStoryPipeline.from_sdxl(sdxl)
        wrapped.set_progress_bar_config(disable=True)
        config = vanilla_config(num_inference_steps=3, height=64, width=64)
        latents = initial_latents([5], (4, 8, 8), torch.float32, "cpu")
        ours = wrapped.generate_story(PROMPTS[:1], SUBJECTS, config=config, latents=latents, output_type="np")
        theirs = sdxl(PROMPTS[:1], num_inference_steps=3, height=64, width=64, guidance_scale=5.0,
                      latents=latents.clone(), output_type="np").images
    finally:
        sdxl.scheduler = ddim
    assert np.abs(ours.images - theirs).max() <= 1e-4


def test_a_bare_string_is_not_split_into_letters(tiny_pipe):
    with pytest.raises(TypeError, match=r"\['dog'\]"):
        tiny_pipe.generate_story(ANCHORS, "dog", config=CONFIG)
    with pytest.raises(TypeError, match="prompts"):
        tiny_pipe.generate_story("a dog", SUBJECTS, config=CONFIG)


def test_sizes_whose_latent_grid_is_odd(tiny_pipe):
    # 72 x 104 px: latent 9 x 13, fine grid 5 x 7, coarse 3 x 4 (SDXL's stride-2 convs round up).
    config = CONFIG.replace(height=72, width=104)
    out = tiny_pipe.generate_story(PROMPTS[:3], SUBJECTS, seed=0, config=config, output_type="np")
    assert out.images.shape == (3, 72, 104, 3) and np.isfinite(out.images).all()
    assert out.subject_masks[0].shape == (3, 4)
