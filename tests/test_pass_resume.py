"""Pass 2 resumes from pass 1's state where injection starts (step S // 10): the same images as
running pass 2 from step 0, in a batch, when anchors are made and for new images from a cache,
with the repeated steps neither computed nor stored twice."""

from contextlib import contextmanager

import numpy as np
import pytest
from story_prompts import ANCHORS, CONFIG, NEW, SUBJECTS

TOL = 1e-5


@contextmanager
def resume(pipe, on: bool):
    before = pipe.resume_pass2
    pipe.resume_pass2 = on
    try:
        yield
    finally:
        pipe.resume_pass2 = before


@contextmanager
def counting_unet_calls(pipe):
    calls = []
    handle = pipe.sdxl.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def _both(pipe, fn):
    with resume(pipe, False), counting_unet_calls(pipe) as full:
        without = fn()
    with resume(pipe, True), counting_unet_calls(pipe) as resumed:
        with_resume = fn()
    return without, with_resume, len(full), len(resumed)


def test_story_with_and_without_resume_is_the_same(tiny_pipe):
    config = CONFIG.replace(num_inference_steps=20)  # injection from step 2: two steps saved
    without, resumed, full_calls, resumed_calls = _both(
        tiny_pipe, lambda: tiny_pipe.generate_story(ANCHORS + NEW, SUBJECTS, seed=3, config=config, output_type="np")
    )
    assert np.abs(without.images - resumed.images).max() <= TOL
    for a, b in zip(without.subject_masks, resumed.subject_masks):
        assert np.array_equal(a, b)
    start = config.injection_steps().start
    assert start == 2
    assert full_calls == 2 * config.num_inference_steps
    assert resumed_calls == 2 * config.num_inference_steps - start


def test_anchors_and_new_images_with_and_without_resume_are_the_same(tiny_pipe):
    config = CONFIG.replace(num_inference_steps=20)
    start = config.injection_steps().start
    no_cache, cache, _, _ = _both(
        tiny_pipe, lambda: tiny_pipe.create_anchors(ANCHORS, SUBJECTS, seed=3, config=config, output_type="np")
    )
    assert np.abs(no_cache.images - cache.images).max() <= TOL
    # Nothing before the resume step is stored for pass 2.
    pass2_steps = {int(k.split("/")[2][1:]) for k in cache.cache.tensors if k.startswith("shared/p2/")}
    assert min(pass2_steps) == start
    assert any(k.startswith(f"shared/p2/s{start - 1}/") for k in no_cache.cache.tensors)
    assert cache.cache.nbytes < no_cache.cache.nbytes

    with resume(tiny_pipe, False):
        new_without = tiny_pipe.generate_from_anchors(no_cache.cache, NEW, output_type="np")
    with resume(tiny_pipe, True):
        new_resumed = tiny_pipe.generate_from_anchors(cache.cache, NEW, output_type="np")
    assert np.abs(new_without.images - new_resumed.images).max() <= TOL


@pytest.mark.parametrize("steps", [4, 12])
def test_resume_at_every_step_count(tiny_pipe, steps):
    # 4 steps: injection starts at step 0, so pass 2 resumes from the very start.
    config = CONFIG.replace(num_inference_steps=steps)
    without, resumed, _, _ = _both(
        tiny_pipe, lambda: tiny_pipe.generate_story(ANCHORS + NEW[:1], SUBJECTS, seed=1, config=config, output_type="np")
    )
    assert np.abs(without.images - resumed.images).max() <= TOL


@pytest.mark.parametrize("scheduler_name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_resume_keeps_a_stateful_schedulers_state(tiny_pipe, scheduler_name):
    # Euler counts its steps; DPM-Solver++ also keeps its last model outputs. Both must resume
    # with the state they had at the resume step.
    import diffusers

    sdxl = tiny_pipe.sdxl
    ddim = sdxl.scheduler
    try:
        sdxl.scheduler = getattr(diffusers, scheduler_name).from_config(ddim.config)
        config = CONFIG.replace(num_inference_steps=20)
        without, resumed, _, _ = _both(
            tiny_pipe, lambda: tiny_pipe.generate_story(ANCHORS + NEW[:1], SUBJECTS, seed=1, config=config, output_type="np")
        )
    finally:
        sdxl.scheduler = ddim
    assert np.abs(without.images - resumed.images).max() <= TOL
