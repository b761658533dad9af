"""Photos and control images are refused by their geometry before any resize or model work: a
thin strip resized to cover the image would take seconds and gigabytes."""

import pytest
from PIL import Image
from story_prompts import ANCHORS, CONFIG, SUBJECTS

from consistory import InputError
from consistory.inputs.image_inputs import check_image_geometry, cover_size


@pytest.mark.parametrize(
    "width, height, target_height, target_width",
    [
        (4032, 3024, 1024, 1024),  # a phone photo
        (3024, 4032, 1024, 1024),
        (8000, 1000, 1024, 1024),  # a panorama at 8:1
        (1000, 8000, 1024, 1024),
        (1000, 4000, 640, 1536),  # 1:4 portrait for a 2.4:1 image: 9.6 times its pixels
        (64, 64, 1024, 1024),  # small photos are upscaled
        (20000, 15000, 1024, 1024),  # large ones shrink
    ],
)
def test_sane_photos_pass(width, height, target_height, target_width):
    check_image_geometry(width, height, target_height, target_width)


@pytest.mark.parametrize(
    "width, height, target_height, target_width, says",
    [
        (1, 16384, 64, 96, "at most 8:1"),  # the strip that took 23.7 s and 4.4 GB
        (16384, 1, 1024, 1024, "at most 8:1"),
        (801, 100, 1024, 1024, "at most 8:1"),
        (1000, 8000, 512, 2048, "over 16 times"),  # within 8:1, but 32 times a 4:1 image's pixels
        (0, 100, 1024, 1024, "no pixels"),
    ],
)
def test_strips_and_resizes_past_the_limits_are_refused(width, height, target_height, target_width, says):
    with pytest.raises(InputError, match=says):
        check_image_geometry(width, height, target_height, target_width)


def test_the_cover_size_is_the_one_diffusers_resizes_to(tiny_pipe):
    processor = tiny_pipe.sdxl.image_processor
    for width, height in [(1, 200), (300, 7), (97, 61), (61, 97)]:
        image = Image.new("RGB", (width, height))
        resized = []
        original = Image.Image.resize

        def spy(self, size, *args, **kwargs):
            resized.append(size)
            return original(self, size, *args, **kwargs)

        Image.Image.resize = spy
        try:
            processor.preprocess(image, height=64, width=96, resize_mode="crop")
        finally:
            Image.Image.resize = original
        assert resized[0] == cover_size(width, height, 64, 96)


def test_the_pipeline_refuses_a_strip_before_any_model_work(tiny_pipe, monkeypatch):
    def no_model_work(*args, **kwargs):
        raise AssertionError("the UNet ran")

    monkeypatch.setattr(tiny_pipe.sdxl.unet, "forward", no_model_work)
    monkeypatch.setattr(tiny_pipe.sdxl, "encode_prompt", no_model_work)
    strip = Image.new("RGB", (1, 16384))
    with pytest.raises(InputError, match="anchor image 0 is 1 x 16384 pixels; its aspect ratio must be at most 8:1"):
        tiny_pipe.create_anchors(ANCHORS[:1], SUBJECTS, config=CONFIG, images=[strip])
    with pytest.raises(InputError, match="anchor image 1 is 1 x 16384"):
        tiny_pipe.generate_story(ANCHORS, SUBJECTS, config=CONFIG, images=[None, strip])
    with pytest.raises(InputError, match="control image 1 is 1 x 16384"):
        tiny_pipe.generate_story(ANCHORS, SUBJECTS, config=CONFIG, control_images=[None, strip])
