"""The `consistory` command line, run as a user would: files on disk, exit codes, one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from consistory.cli.main import main

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
    # Nothing on stderr but what the user can act on: no library warnings (torchvision, ...).
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        "consistory: loading model preset:tiny:0 on cpu"
    ], done.stderr
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
    argv = ["generate", "--subject", "red fox", "--style", "A watercolor of",
            "--settings", "in the snow", "--settings", "by a river", "--seed", "3"]
    assert main([*argv, *TINY, "--out", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "story.json").read_text())
    # A sentence as a person would write it: the subject gets its article, words one space apart.
    assert manifest["prompts"] == ["A watercolor of a red fox in the snow", "A watercolor of a red fox by a river"]
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
        (["generate", "--subject", "dog", "--prompt", "a dog", "--prompt", "a dog running", "--model", "./no/such/model"],
         "./no/such/model"),
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


def _without_hub_settings(**extra):
    """The environment of a user's shell: no HF_HUB_OFFLINE (the test session sets it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, **extra}


def _closed_loopback_url():
    import socket

    with socket.socket() as sock:  # bound and closed again: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("model_args", [[], ["--model", "someorg/some-sdxl"]], ids=["default-model", "hub-id"])
def test_an_unreachable_hub_fails_in_seconds_with_one_line(model_args, tmp_path):
    """No route to the hub and nothing cached: one line naming the model and the ways out, not
    minutes of retries and a traceback."""
    env = _without_hub_settings(HF_ENDPOINT=_closed_loopback_url(), HF_HOME=str(tmp_path / "hf"))
    argv = ["generate", "--subject", "dog", "--prompt", "a dog", "--prompt", "a dog running",
            *model_args, "--out", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-m", "consistory.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 1
    model = model_args[1] if model_args else "stabilityai/stable-diffusion-xl-base-1.0"
    assert_one_line_error(done.stderr, model, "could not be reached", "--model tiny", "HF_HUB_OFFLINE=1")
    assert not (tmp_path / "out").exists()


def test_offline_hub_without_the_model_cached_says_so(tmp_path, capsys):
    # The test session runs with HF_HUB_OFFLINE=1 (conftest), as a user who set it would.
    argv = ["generate", "--subject", "dog", "--prompt", "a dog", "--prompt", "a dog running",
            "--model", "someorg/not-cached", "--out", str(tmp_path)]
    assert main(argv) == 1
    assert_one_line_error(capsys.readouterr().err, "someorg/not-cached", "not in the local Hugging Face cache",
                          "--model tiny")


def test_help_answers_without_loading_torch():
    code = ("import sys; from consistory.cli import main; main(['--help']); main(['batch', '--help']); "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'ray') if m in sys.modules]; "
            "print('HEAVY', heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout and "usage: consistory batch" in done.stdout
    assert done.stderr == ""


def test_more_anchors_than_prompts_is_refused(tmp_path, capsys):
    argv = ["generate", "--subject", "dog", "--prompt", "a dog on a hill", "--n-anchors", "2"]
    assert main([*argv, *TINY, "--out", str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr().err, "1 prompt(s) for 2 anchors", "--n-anchors 1")
    assert not (tmp_path / "story.json").exists()


def test_a_one_prompt_story_with_the_default_anchors_is_made_as_over_http(tmp_path, capsys):
    """The service answers a 1-prompt story (its one prompt is its anchor); so does the CLI."""
    argv = ["generate", "--subject", "dog", "--prompt", "a dog on a hill", "--no-progress"]
    assert main([*argv, *TINY, "--out", str(tmp_path)]) == 0
    assert "wrote 1 image, grid.png" in capsys.readouterr().out
    record = json.loads((tmp_path / "story.json").read_text())
    assert record["n_anchors"] == 1 and record["config"]["n_anchors"] == 1 and len(record["files"]) == 1


def test_the_progress_bar_counts_each_pass_in_the_steps_the_user_set(tmp_path, capsys):
    argv = ["generate", "--model", "tiny", "--steps", "3", "--height", "64", "--subject", "dog",
            "--prompt", "a dog", "--prompt", "a dog running", "--out", str(tmp_path)]
    assert main(argv) == 0
    bar = capsys.readouterr().err
    assert "pass 1 of 2" in bar and "pass 2 of 2" in bar and "3/3" in bar
    assert "/6" not in bar  # not both passes' UNet steps as one count


def test_plural_subjects_are_found_from_the_command_line(tmp_path):
    argv = ["generate", "--subject", "macaron", "--prompt", "a macaron on a table",
            "--prompt", "an array of delicate macarons on a porcelain plate"]
    assert main([*argv, *TINY, "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "story.json").read_text())["subjects"] == ["macaron"]
