"""The UNet under torch.compile: graphs made once per image size and batch size, then reused by
generations with other prompts and seeds, and the images those of the eager UNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from story_prompts import ANCHORS, CONFIG, NEW, SUBJECTS
from torch._dynamo.testing import CompileCounter

from consistory import ConsiStoryPipeline
from consistory.method import compiled_unet

OTHER = ["A photo of a dog on a boat", "a dog asleep on a sofa", "a dog in a library"]


@pytest.fixture
def compiled_pipe():
    pipe = ConsiStoryPipeline.from_preset("tiny", seed=0, compile=True)
    pipe.set_progress_bar_config(disable=True)
    torch._dynamo.reset()
    yield pipe
    torch._dynamo.reset()


def _story(pipe, prompts, seed, config=CONFIG):
    return pipe.generate_story(prompts, SUBJECTS, seed=seed, config=config, output_type="np").images


def test_graphs_are_made_once_per_batch_size_and_reused(compiled_pipe, monkeypatch):
    counter = CompileCounter()  # a backend that counts the graphs it is handed and runs them as they are
    options = compiled_unet.compile_options
    monkeypatch.setattr(compiled_unet, "compile_options", lambda device: {**options(device), "backend": counter})
    first = _story(compiled_pipe, ANCHORS + NEW[:1], seed=3)
    made = counter.frame_count
    assert made > 0 and compiled_unet.is_compiled(compiled_pipe.sdxl.unet)
    second = _story(compiled_pipe, OTHER, seed=11)  # other prompts and seeds, the same shapes
    assert counter.frame_count == made, "a story at a size and batch seen before compiled again"
    anchors = compiled_pipe.create_anchors(OTHER, SUBJECTS, seed=5, config=CONFIG, output_type="latent")
    assert counter.frame_count == made, "recording anchors at a size and batch seen before compiled again"
    compiled_pipe.generate_from_anchors(anchors.cache, NEW[:1], output_type="latent")
    assert counter.frame_count > made  # a new batch size (1 row) gets its own graphs

    compiled_pipe.compile = False  # back to the eager UNet (at the next generation): the same images
    assert np.abs(_story(compiled_pipe, ANCHORS + NEW[:1], seed=3) - first).max() <= 1e-5
    assert not compiled_unet.is_compiled(compiled_pipe.sdxl.unet)
    assert np.abs(_story(compiled_pipe, OTHER, seed=11) - second).max() <= 1e-5


def test_inductor_images_equal_the_eager_ones(compiled_pipe):
    # Few steps and no query mixing: fewer shapes, so inductor compiles in reasonable time on a CPU.
    config = CONFIG.replace(num_inference_steps=3, query_mixing=False)
    compiled = _story(compiled_pipe, ANCHORS + NEW[:1], seed=3, config=config)
    again = _story(compiled_pipe, OTHER, seed=4, config=config)
    compiled_pipe.compile = False
    assert np.abs(compiled - _story(compiled_pipe, ANCHORS + NEW[:1], seed=3, config=config)).max() <= 1e-3
    assert np.abs(again - _story(compiled_pipe, OTHER, seed=4, config=config)).max() <= 1e-3
