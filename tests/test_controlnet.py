"""ControlNet per prompt, on the tiny preset with a random ControlNet built from its UNet."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from story_prompts import ANCHORS, CONFIG, NEW, SUBJECTS

from consistory import AnchorCache, ConsiStoryPipeline, InputError, vanilla_config
from consistory.presets.sdxl import build_preset_controlnet
from consistory.seeds import initial_latents

PROMPTS = ANCHORS + NEW
TOL = 1e-4


def pose(width=96, height=64, lean=0) -> Image.Image:
    """A stick figure, as a pose ControlNet's input looks."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    cx = width // 2 + lean
    draw.ellipse((cx - 6, 4, cx + 6, 16), outline=(255, 0, 0), width=2)
    draw.line((cx, 16, cx, 42), fill=(0, 255, 0), width=3)
    draw.line((cx - 18, 26, cx + 18, 22), fill=(0, 0, 255), width=3)
    draw.line((cx, 42, cx - 12, 62), fill=(255, 255, 0), width=3)
    draw.line((cx, 42, cx + 12, 62), fill=(0, 255, 255), width=3)
    return image


@pytest.fixture(scope="module")
def controlnet(tiny_pipe):
    return build_preset_controlnet(tiny_pipe.sdxl.unet, seed=0)


@pytest.fixture(scope="module")
def cn_pipe(tiny_pipe, controlnet):
    pipe = ConsiStoryPipeline.from_sdxl(tiny_pipe.sdxl, model_id=tiny_pipe.model_id, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def plain_story(tiny_pipe):
    return tiny_pipe.generate_story(PROMPTS, SUBJECTS, seed=3, config=CONFIG, output_type="np")


def test_all_mechanisms_off_equals_diffusers_controlnet_pipeline(tiny_pipe, controlnet):
    from diffusers import StableDiffusionXLControlNetPipeline

    components = {k: v for k, v in tiny_pipe.sdxl.components.items() if k not in ("image_encoder", "feature_extractor")}
    theirs_pipe = StableDiffusionXLControlNetPipeline(**components, controlnet=controlnet, add_watermarker=False)
    theirs_pipe.set_progress_bar_config(disable=True)
    ours_pipe = ConsiStoryPipeline.from_sdxl(theirs_pipe)
    ours_pipe.set_progress_bar_config(disable=True)
    assert ours_pipe.controlnet is controlnet
    config = vanilla_config(num_inference_steps=4, height=64, width=96)
    latents = initial_latents([0, 1, 2], (4, 8, 12), torch.float32, "cpu")
    controls = [pose(), pose(lean=-20), pose(lean=20)]
    ours = ours_pipe.generate_story(PROMPTS[:3], SUBJECTS, config=config, latents=latents, output_type="np",
                                    control_images=controls, controlnet_conditioning_scale=0.7)
    theirs = theirs_pipe(
        PROMPTS[:3], image=controls, num_inference_steps=4, height=64, width=96, guidance_scale=config.guidance_scale,
        latents=latents.clone(), output_type="np", controlnet_conditioning_scale=0.7,
    ).images
    plain = tiny_pipe.generate_story(PROMPTS[:3], SUBJECTS, config=config, latents=latents, output_type="np")
    assert np.abs(ours.images - theirs).max() <= TOL
    assert np.abs(ours.images - plain.images).max() > 1e-3  # the control did something


def test_conditioning_scale_zero_equals_no_controlnet(cn_pipe, plain_story):
    controls = [pose()] * len(PROMPTS)
    out = cn_pipe.generate_story(PROMPTS, SUBJECTS, seed=3, config=CONFIG, output_type="np", control_images=controls,
                                 controlnet_conditioning_scale=0.0)
    assert np.abs(out.images - plain_story.images).max() <= TOL


def test_a_control_image_changes_its_image_and_only_its_image(cn_pipe, plain_story):
    controls = [None, None, pose(), None, None]
    out = cn_pipe.generate_story(PROMPTS, SUBJECTS, seed=3, config=CONFIG, output_type="np", control_images=controls)
    changed = np.abs(out.images - plain_story.images).max(axis=(1, 2, 3))
    assert changed[2] > 1e-2
    assert changed[[0, 1, 3, 4]].max() <= TOL
    # A control on an anchor reaches the other images through SDSA and injection, as it should.
    on_anchor = cn_pipe.generate_story(PROMPTS, SUBJECTS, seed=3, config=CONFIG, output_type="np",
                                       control_images=[pose()] + [None] * 4)
    assert np.abs(on_anchor.images - plain_story.images).max(axis=(1, 2, 3)).min() > TOL


def test_cached_equals_batch_with_controls(cn_pipe):
    controls = [pose(lean=-15), None, pose(lean=10), None, pose(lean=25)]
    story = cn_pipe.generate_story(PROMPTS, SUBJECTS, seed=3, config=CONFIG, output_type="np", control_images=controls,
                                   controlnet_conditioning_scale=0.8)
    made = cn_pipe.create_anchors(ANCHORS, SUBJECTS, seed=3, config=CONFIG, output_type="np",
                                  control_images=controls[:2], controlnet_conditioning_scale=0.8)
    cache = AnchorCache.from_bytes(made.cache.to_bytes())
    new = cn_pipe.generate_from_anchors(cache, NEW, output_type="np", control_images=controls[2:],
                                        controlnet_conditioning_scale=0.8)
    assert np.abs(made.images - story.images[:2]).max() <= TOL
    assert np.abs(new.images - story.images[2:]).max() <= TOL
    alone = cn_pipe.generate_from_anchors(cache, NEW[2:], seeds=new.seeds[2:], output_type="np",
                                          control_images=controls[4:], controlnet_conditioning_scale=0.8)
    assert np.abs(alone.images[0] - new.images[2]).max() <= TOL


def test_a_photo_anchor_with_a_control(cn_pipe):
    from test_photo_anchors import dog_photo

    config = vanilla_config(num_inference_steps=12, height=64, width=96)
    photo = dog_photo()
    # The inversion sees the control its row is sampled with: the photo still comes back.
    out = cn_pipe.create_anchors(ANCHORS[:1], SUBJECTS, config=config, images=[photo], control_images=[pose()],
                                 output_type="latent")
    bare = cn_pipe.create_anchors(ANCHORS[:1], SUBJECTS, config=config, images=[photo], output_type="latent")
    assert torch.abs(out.images - bare.images).max() <= 1e-5 * bare.images.abs().max()


def test_control_input_errors(tiny_pipe, cn_pipe):
    with pytest.raises(InputError, match="need a ControlNet"):
        tiny_pipe.generate_story(PROMPTS[:3], SUBJECTS, config=CONFIG, control_images=[pose(), None, None])
    with pytest.raises(InputError, match="2 control images for 3 prompts"):
        cn_pipe.generate_story(PROMPTS[:3], SUBJECTS, config=CONFIG, control_images=[pose(), None])
    with pytest.raises(InputError, match="control image 1 must be a PIL image"):
        cn_pipe.generate_story(PROMPTS[:3], SUBJECTS, config=CONFIG, control_images=[None, "pose.png", None])
    with pytest.raises(InputError, match="start < end"):
        cn_pipe.generate_story(PROMPTS[:3], SUBJECTS, config=CONFIG, control_images=[pose()] * 3,
                               control_guidance=(0.8, 0.2))
