"""`--image` (photo anchors) and `--control` (ControlNet per prompt) on the command line, run as a
user runs it: files on disk, exit codes, one-line errors."""

import json

import numpy as np
import pytest
from PIL import Image
from test_cli import SEED, TINY, assert_one_line_error, pixels, prompt_args
from test_controlnet import pose
from test_photo_anchors import dog_photo

from consistory import ConsiStoryPipeline
from consistory.cli.main import main
from consistory.config import ConsiStoryConfig
from consistory.presets.sdxl import build_preset_controlnet

ANCHOR_PROMPTS = ["a photo of my dog", "a dog asleep on a sofa"]
NEW_PROMPTS = ["a dog on a boat", "a dog in the snow"]
CONFIG = ConsiStoryConfig(num_inference_steps=3, height=64, width=64)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    dog_photo(64, 64).save(root / "dog.png")
    dog_photo(80, 60, seed=4).save(root / "dog.jpg", quality=95)
    pose(64, 64).save(root / "pose.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_anchors_from_a_photo_and_a_pose_then_extend_with_a_pose(files, tmp_path):
    cache = tmp_path / "dog.cache"
    argv = ["anchors", "--subject", "dog", *prompt_args(ANCHOR_PROMPTS), "--seed", str(SEED), "--save", str(cache),
            "--image", str(files / "dog.png"), "--control", "none", "--control", str(files / "pose.png"),
            "--controlnet", "tiny", "--control-scale", "0.8", *TINY, "--out", str(tmp_path / "anchors")]
    assert main(argv) == 0
    record = json.loads((tmp_path / "anchors" / "anchors.json").read_text())
    assert record["images"] == [str((files / "dog.png").resolve())]
    assert record["controls"] == [None, str((files / "pose.png").resolve())] and record["controlnet"] == "tiny"

    # The same as the library makes from the same photo and control.
    pipe = ConsiStoryPipeline.from_preset("tiny")
    pipe.set_progress_bar_config(disable=True)
    pipe.controlnet = build_preset_controlnet(pipe.sdxl.unet)
    photo = Image.open(files / "dog.png").convert("RGB")
    made = pipe.create_anchors(ANCHOR_PROMPTS, ["dog"], seed=SEED, config=CONFIG, images=[photo, None],
                               control_images=[None, pose(64, 64)], controlnet_conditioning_scale=0.8)
    for i, image in enumerate(made.images):
        assert np.abs(pixels(tmp_path / "anchors" / f"{i:02d}.png") - np.asarray(image, dtype=np.int16)).max() <= 1

    argv = ["extend", str(cache), *prompt_args(NEW_PROMPTS), "--control", str(files / "pose.png"),
            "--controlnet", "tiny", "--control-scale", "0.8", "--no-progress", "--out", str(tmp_path / "extend")]
    assert main(argv) == 0
    new = pipe.generate_from_anchors(made.cache, NEW_PROMPTS, control_images=[pose(64, 64), None],
                                     controlnet_conditioning_scale=0.8)
    for i, image in enumerate(new.images):
        assert np.abs(pixels(tmp_path / "extend" / f"{i:02d}.png") - np.asarray(image, dtype=np.int16)).max() <= 1


def test_generate_with_a_jpeg_photo_anchor_and_a_control(files, tmp_path):
    argv = ["generate", "--subject", "dog", *prompt_args(ANCHOR_PROMPTS + NEW_PROMPTS[:1]), "--image", "none",
            "--image", str(files / "dog.jpg"), "--control", "none", "--control", "none", "--control",
            str(files / "pose.png"), "--controlnet", "tiny", *TINY, "--out", str(tmp_path)]
    assert main(argv) == 0
    record = json.loads((tmp_path / "story.json").read_text())
    assert record["files"] == ["00.png", "01.png", "02.png"] and record["images"][0] is None


@pytest.mark.parametrize("extra, fragment", [
    (["--image", "missing.png"], "--image missing.png: no such file"),
    (["--image", "{files}/notes.txt"], "not an image this tool can read"),
    (["--control", "{files}/pose.png"], "--control needs --controlnet"),
    (["--image", "{files}/dog.png"] * 3, "got 3 --image for 2 anchor prompts"),
    (["--control", "{files}/nowhere.png", "--controlnet", "tiny"], "no such file"),
    (["--control", "{files}/pose.png", "--controlnet", "{files}"], "holds no ControlNet"),
])
def test_bad_image_options_are_one_line_errors(files, tmp_path, capsys, extra, fragment):
    extra = [arg.format(files=files) for arg in extra]
    argv = ["anchors", "--subject", "dog", *prompt_args(ANCHOR_PROMPTS), "--save", str(tmp_path / "c.cache"),
            *extra, *TINY, "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, fragment.format(files=files))
    assert not (tmp_path / "out").exists() and not (tmp_path / "c.cache").exists()
