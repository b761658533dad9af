"""Anchors from photos: edit-friendly DDPM inversion regenerates the photo, and the photo is what
new images attend to; cached equals batch holds with photo anchors in the set."""

import numpy as np
import pytest
import torch
from PIL import Image
from story_prompts import ANCHORS, CONFIG, NEW, SUBJECTS

from consistory import AnchorCache, InputError, vanilla_config


def dog_photo(height=64, width=96, seed=0) -> Image.Image:
    """A stand-in photo: a bright blob (the subject) on a textured background."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    blob = np.exp(-(((y - height / 2) / (height / 4)) ** 2 + ((x - width / 2) / (width / 5)) ** 2))
    pixels = 0.25 + 0.6 * blob[..., None] * np.array([0.9, 0.6, 0.3]) + 0.15 * rng.random((height, width, 3))
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))


def vae_round_trip(sdxl, photo):
    """The photo through the VAE: the posterior's mean, scaled, and decoded again (diffusers' calls)."""
    vae = sdxl.vae
    with torch.no_grad():
        pixels = sdxl.image_processor.preprocess(photo, height=photo.height, width=photo.width)
        latent = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        decoded = vae.decode(latent / vae.config.scaling_factor, return_dict=False)[0]
    return latent, sdxl.image_processor.postprocess(decoded, output_type="np")[0]


def test_sampling_with_the_noise_maps_regenerates_the_photo(tiny_pipe):
    config = vanilla_config(num_inference_steps=12, height=64, width=96)
    photo = dog_photo()
    latent, round_trip = vae_round_trip(tiny_pipe.sdxl, photo)
    out = tiny_pipe.create_anchors(["a photo of my dog"], SUBJECTS, config=config, images=[photo], output_type="latent")
    assert torch.abs(out.images - latent).max() <= 1e-5 * latent.abs().max()
    image = tiny_pipe.create_anchors(["a photo of my dog"], SUBJECTS, config=config, images=[photo], output_type="np")
    assert np.abs(image.images[0] - round_trip).max() <= 1e-4
    # Without the photo, the same prompt and seed give another image altogether.
    generated = tiny_pipe.create_anchors(["a photo of my dog"], SUBJECTS, config=config, output_type="np")
    assert np.abs(generated.images[0] - round_trip).max() > 0.05


def test_a_photo_anchor_is_what_new_images_attend_to(tiny_pipe):
    photo = dog_photo()
    from_photo = tiny_pipe.create_anchors(ANCHORS, SUBJECTS, seed=3, config=CONFIG, images=[photo, None], output_type="np")
    generated = tiny_pipe.create_anchors(ANCHORS, SUBJECTS, seed=3, config=CONFIG, output_type="np")
    assert np.abs(from_photo.images[0] - generated.images[0]).max() > 1e-2
    new_photo = tiny_pipe.generate_from_anchors(from_photo.cache, NEW[:2], output_type="np")
    new_generated = tiny_pipe.generate_from_anchors(generated.cache, NEW[:2], output_type="np")
    assert new_photo.seeds == new_generated.seeds
    assert np.abs(new_photo.images - new_generated.images).max() > 1e-3


def test_cached_equals_batch_with_a_photo_anchor(tiny_pipe):
    photo = dog_photo(seed=1)
    # Four rows: the two anchors alone run padded to as many (a batch that holds photos runs with
    # a multiple of 4 rows), so the photo row computes the same in both.
    story = tiny_pipe.generate_story(ANCHORS + NEW[:2], SUBJECTS, seed=3, config=CONFIG, images=[None, photo],
                                     output_type="np")
    made = tiny_pipe.create_anchors(ANCHORS, SUBJECTS, seed=3, config=CONFIG, images=[None, photo], output_type="np")
    cache = AnchorCache.from_bytes(made.cache.to_bytes())
    new = tiny_pipe.generate_from_anchors(cache, NEW[:2], output_type="np")
    assert np.abs(new.images - story.images[2:]).max() <= 1e-4
    assert np.abs(made.images[0] - story.images[0]).max() <= 1e-4
    assert np.abs(made.images[1] - story.images[1]).max() <= 1e-4
    # Pass 2 from step 0 (no pass-1 snapshot) gives the same images: the photo's maps are per step.
    tiny_pipe.resume_pass2 = False
    try:
        again = tiny_pipe.create_anchors(ANCHORS, SUBJECTS, seed=3, config=CONFIG, images=[None, photo], output_type="np")
    finally:
        tiny_pipe.resume_pass2 = True
    assert np.abs(again.images - made.images).max() <= 1e-4


PHOTO_PROMPT = "a photo of my dog"
PHOTO_SEED = 7


@pytest.fixture(scope="module")
def photo_made_alone(tiny_pipe):
    """The photo anchor made alone, with every mechanism off and with the method's defaults."""
    photo = dog_photo(seed=1)
    made = {
        name: tiny_pipe.create_anchors([PHOTO_PROMPT], SUBJECTS, seed=PHOTO_SEED, config=config, images=[photo],
                                       output_type="np").images[0]
        for name, config in (("off", vanilla_config(num_inference_steps=12, height=64, width=96)), ("on", CONFIG))
    }
    return photo, made


# The other rows of the batch, in order: None for the photo anchor under test, "generated" for an
# anchor from its prompt, "photo" for another photo anchor.
BESIDE = [
    (None, "generated"),
    ("generated", None, "photo"),
    ("photo", "generated", "generated", None),
]


@pytest.mark.parametrize("rows", BESIDE, ids=["1-other", "2-others", "3-others"])
def test_a_photo_anchor_is_the_same_beside_other_rows_with_every_mechanism_off(tiny_pipe, photo_made_alone, rows):
    """Its maps are made in the batch it is regenerated in: it lands on the photo in any batch."""
    photo, alone = photo_made_alone
    _, round_trip = vae_round_trip(tiny_pipe.sdxl, photo)
    assert np.abs(alone["off"] - round_trip).max() <= 1e-4
    at = rows.index(None)
    prompts = [PHOTO_PROMPT if r is None else (ANCHORS + NEW)[i] for i, r in enumerate(rows)]
    images = [photo if r is None else dog_photo(seed=4) if r == "photo" else None for r in rows]
    config = vanilla_config(num_inference_steps=12, height=64, width=96)
    # Image i gets seed + i: the photo's row keeps the seed it had alone.
    out = tiny_pipe.create_anchors(prompts, SUBJECTS, seed=PHOTO_SEED - at, config=config, images=images,
                                   output_type="np")
    assert np.abs(out.images[at] - alone["off"]).max() <= 1e-4
    assert np.abs(out.images[at] - round_trip).max() <= 1e-4


@pytest.mark.parametrize("others", [1, 2, 3])
def test_a_photo_anchor_is_the_same_beside_images_that_are_not_anchors(tiny_pipe, photo_made_alone, others):
    """With the method on, images that are not anchors do not influence the anchors; a photo
    anchor, whose eta = 1 steps amplify rounding, computes the same beside them as alone."""
    photo, alone = photo_made_alone
    story = tiny_pipe.generate_story([PHOTO_PROMPT] + NEW[:others], SUBJECTS, seed=PHOTO_SEED,
                                     config=CONFIG.replace(n_anchors=1), images=[photo], output_type="np")
    assert len(story.images) == 1 + others and story.seeds == list(range(PHOTO_SEED, PHOTO_SEED + 1 + others))
    assert len(story.subject_masks) == 1 + others
    assert np.abs(story.images[0] - alone["on"]).max() <= 1e-4


def test_a_photo_anchor_with_a_control_is_the_same_beside_images_with_controls(tiny_pipe, photo_made_alone):
    """ControlNet runs on every row of a batch that holds photos: its rounding, too, depends on
    how many rows it runs on."""
    from test_controlnet import pose

    from consistory import ConsiStoryPipeline
    from consistory.presets.sdxl import build_preset_controlnet

    photo, _ = photo_made_alone
    pipe = ConsiStoryPipeline.from_sdxl(tiny_pipe.sdxl, model_id=tiny_pipe.model_id,
                                        controlnet=build_preset_controlnet(tiny_pipe.sdxl.unet, seed=0))
    pipe.set_progress_bar_config(disable=True)
    alone = pipe.create_anchors([PHOTO_PROMPT], SUBJECTS, seed=PHOTO_SEED, config=CONFIG, images=[photo],
                                control_images=[pose()], output_type="np")
    story = pipe.generate_story([PHOTO_PROMPT] + NEW[:2], SUBJECTS, seed=PHOTO_SEED, config=CONFIG.replace(n_anchors=1),
                                images=[photo], control_images=[pose(), pose(lean=8), None], output_type="np")
    assert np.abs(story.images[0] - alone.images[0]).max() <= 1e-4


def test_two_photo_anchors_and_a_photo_of_another_size(tiny_pipe):
    photos = [dog_photo(seed=2), dog_photo(height=120, width=80, seed=3)]  # portrait: cropped to fit
    out = tiny_pipe.create_anchors(ANCHORS, SUBJECTS, seed=5, config=CONFIG, images=photos, output_type="pil")
    assert [im.size for im in out.images] == [(96, 64), (96, 64)]
    new = tiny_pipe.generate_from_anchors(out.cache, NEW[:1], output_type="np")
    assert np.isfinite(new.images).all()


def test_bad_anchor_images_are_refused(tiny_pipe):
    photo = dog_photo()
    with pytest.raises(InputError, match="one per anchor prompt"):
        tiny_pipe.create_anchors(ANCHORS, SUBJECTS, config=CONFIG, images=[photo])
    with pytest.raises(InputError, match="not a single image"):
        tiny_pipe.create_anchors(ANCHORS, SUBJECTS, config=CONFIG, images=photo)
    with pytest.raises(InputError, match="anchor image 1 must be a PIL image"):
        tiny_pipe.create_anchors(ANCHORS, SUBJECTS, config=CONFIG, images=[photo, "dog.png"])


def test_a_sampler_that_scales_latents_is_refused_for_photos(tiny_pipe):
    from diffusers import EulerDiscreteScheduler

    from consistory import ConsiStoryPipeline

    sdxl = tiny_pipe.sdxl
    ddim = sdxl.scheduler
    try:
        sdxl.scheduler = EulerDiscreteScheduler.from_config(ddim.config)
        with pytest.raises(InputError, match="variance-preserving sampler"):
            ConsiStoryPipeline.from_sdxl(sdxl).create_anchors(ANCHORS[:1], SUBJECTS, config=CONFIG, images=[dog_photo()])
    finally:
        sdxl.scheduler = ddim
