"""The `consistory` command line, run as a user would: files on disk, exit codes, one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from consistory.cli import main

TINY = ["--model", "tiny", "--steps", "3", "--height", "64", "--width", "64", "--no-progress"]
ANCHOR_PROMPTS = ["a dog running in a field", "a dog asleep on a sofa"]
NEW_PROMPT = "a dog on a boat"
SEED = 5


def prompt_args(prompts):
    return [arg for p in prompts for arg in ("--prompt", p)]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def assert_one_line_error(err, *fragments):
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("consistory: error:")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """`generate` of the anchors' prompts followed by the new prompt, in one batch."""
    out = tmp_path_factory.mktemp("story")
    argv = ["generate", "--subject", "dog", *prompt_args([*ANCHOR_PROMPTS, NEW_PROMPT]), "--seed", str(SEED)]
    assert main([*argv, *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def anchors(tmp_path_factory):
    out = tmp_path_factory.mktemp("anchors")
    cache = out / "dog.cache"
    argv = ["anchors", "--subject", "dog", *prompt_args(ANCHOR_PROMPTS), "--seed", str(SEED), "--save", str(cache)]
    assert main([*argv, *TINY, "--out", str(out)]) == 0
    return out, cache


def test_generate_writes_images_grid_and_manifest(story):
    manifest = json.loads((story / "story.json").read_text())
    assert manifest["files"] == ["00.png", "01.png", "02.png"]
    assert manifest["prompts"] == [*ANCHOR_PROMPTS, NEW_PROMPT]
    assert manifest["seeds"] == [SEED, SEED + 1, SEED + 2]
    assert manifest["model"] == "preset:tiny:0"
    assert manifest["config"]["height"] == 64 and manifest["config"]["num_inference_steps"] == 3
    for name in manifest["files"]:
        assert Image.open(story / name).size == (64, 64)
    grid = pixels(story / manifest["grid"])
    assert grid.shape == (64, 3 * 64, 3)
    for i, name in enumerate(manifest["files"]):  # the grid shows the images in prompt order
        assert np.array_equal(grid[:, i * 64 : (i + 1) * 64], pixels(story / name))


def test_anchors_equal_the_batch_story_anchors(story, anchors):
    anchor_dir, cache = anchors
    manifest = json.loads((anchor_dir / "anchors.json").read_text())
    assert manifest["seeds"] == [SEED, SEED + 1] and manifest["files"] == ["00.png", "01.png"]
    assert manifest["cache"] == str(cache.resolve()) and cache.is_file()
    for name in manifest["files"]:
        assert np.abs(pixels(anchor_dir / name) - pixels(story / name)).max() <= 1


def test_extend_in_a_new_process_equals_the_batch_story(story, anchors, tmp_path):
    """The user's flow: anchors in one process, `extend` later in another, via the entry point."""
    _, cache = anchors
    argv = ["extend", str(cache), "--prompt", NEW_PROMPT, "--no-progress", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, "-m", "consistory.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert str(tmp_path) in done.stdout
    manifest = json.loads((tmp_path / "extend.json").read_text())
    assert manifest["seeds"] == [SEED + 2]  # default seeds continue the anchors'
    assert manifest["files"] == ["00.png"] and (tmp_path / "grid.png").is_file()
    # Cached equals batch: the new image is the one-batch story's image at its position.
    assert np.abs(pixels(tmp_path / "00.png") - pixels(story / "02.png")).max() <= 1


def test_extend_refuses_a_cache_from_another_model(anchors, tmp_path, capsys):
    _, cache = anchors
    argv = ["extend", str(cache), "--prompt", NEW_PROMPT, "--model", "preset:tiny:1", "--out", str(tmp_path)]
    assert main([*argv, "--no-progress"]) == 2
    assert_one_line_error(capsys.readouterr().err, "preset:tiny:0")
    assert not (tmp_path / "extend.json").exists()


def test_settings_and_style_build_the_prompts(tmp_path):
    argv = ["generate", "--subject", "red fox", "--style", "A watercolor of ",
            "--settings", "in the snow", "--settings", "by a river", "--seed", "3"]
    assert main([*argv, *TINY, "--out", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "story.json").read_text())
    assert manifest["prompts"] == ["A watercolor of red fox in the snow", "A watercolor of red fox by a river"]
    assert manifest["seeds"] == [3, 4]


def test_prompt_without_the_subject_is_a_one_line_error(tmp_path, capsys):
    argv = ["generate", "--subject", "dog", "--prompt", "a dog on a hill", "--prompt", "a cat on a mat"]
    assert main([*argv, *TINY, "--out", str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr().err, "'a cat on a mat'")
    assert not (tmp_path / "story.json").exists()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["extend", "no/such/dog.cache", "--prompt", "a dog"], "no/such/dog.cache"),
        (["generate", "--subject", "dog", "--prompt", "a dog", "--height", "65"], "height must be a multiple of 8"),
        (["generate", "--subject", "dog", "--prompt", "a dog", "--model", "./no/such/model"], "./no/such/model"),
        (["generate", "--prompt", "a dog"], "--subject"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, fragment, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys.readouterr().err, fragment)


def test_a_file_that_is_not_a_cache_is_refused(tmp_path, capsys):
    bogus = tmp_path / "bogus.cache"
    bogus.write_bytes(b"not a safetensors file at all")
    assert main(["extend", str(bogus), "--prompt", "a dog", "--out", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys.readouterr().err, "not an anchor cache")


@pytest.mark.parametrize("command", [[], ["generate"], ["anchors"], ["extend"]])
def test_help(command, capsys):
    assert main([*command, "--help"]) == 0
    assert "usage: consistory" in capsys.readouterr().out


def test_compact_anchors_from_the_command_line_extend_like_the_library(tmp_path):
    from consistory import AnchorCache, ConsiStoryConfig, ConsiStoryPipeline

    cache = tmp_path / "dog.cache"
    argv = ["anchors", "--subject", "dog", "--seed", str(SEED), "--save", str(cache), "--codec", "compact"]
    for prompt in ANCHOR_PROMPTS:
        argv += ["--prompt", prompt]
    assert main([*argv, *TINY, "--out", str(tmp_path / "anchors")]) == 0
    manifest = json.loads((tmp_path / "anchors" / "anchors.json").read_text())
    assert manifest["cache_codec"] == "compact" and AnchorCache.load(cache).codec == "compact"
    assert main(["extend", str(cache), "--prompt", NEW_PROMPT, "--no-progress", "--out", str(tmp_path / "more")]) == 0
    pipe = ConsiStoryPipeline.from_preset("tiny")
    pipe.set_progress_bar_config(disable=True)
    config = ConsiStoryConfig(num_inference_steps=3, height=64, width=64)
    made = pipe.create_anchors(ANCHOR_PROMPTS, ["dog"], seed=SEED, config=config, cache_codec="compact")
    expected = np.asarray(pipe.generate_from_anchors(made.cache, [NEW_PROMPT]).images[0], dtype=np.int16)
    assert np.abs(pixels(tmp_path / "more" / "00.png") - expected).max() <= 1
