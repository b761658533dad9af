"""The progress callback: one report per UNet step, in order, with both passes labelled; a
callback that raises stops the generation (how callers cancel)."""

from __future__ import annotations

import pytest

from consistory import ConsiStoryConfig, ConsiStoryPipeline, StepProgress

STEPS = 10
CONFIG = ConsiStoryConfig(num_inference_steps=STEPS, height=64, width=64)


@pytest.fixture(scope="module")
def pipe() -> ConsiStoryPipeline:
    pipe = ConsiStoryPipeline.from_preset("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_every_step_is_reported_once_in_order(pipe) -> None:
    seen: list[StepProgress] = []
    pipe.generate_story(["a cat", "a cat in a box"], ["cat"], config=CONFIG, output_type="latent", progress=seen.append)
    resume = CONFIG.injection_steps().start  # pass 2 starts where injection does
    assert [(p.pass_index, p.step) for p in seen] == (
        [(1, s) for s in range(STEPS)] + [(2, s) for s in range(resume, STEPS)]
    )
    assert [p.done for p in seen] == list(range(1, len(seen) + 1))
    assert {p.total for p in seen} == {len(seen)} and seen[-1].fraction == 1.0
    assert {p.steps for p in seen} == {STEPS}


def test_one_pass_when_injection_is_off(pipe) -> None:
    seen: list[StepProgress] = []
    config = CONFIG.replace(feature_injection=False)
    pipe.generate_story(["a cat", "a cat in a box"], ["cat"], config=config, output_type="latent", progress=seen.append)
    assert [(p.pass_index, p.step) for p in seen] == [(1, s) for s in range(STEPS)]


def test_a_callback_that_raises_stops_the_generation(pipe) -> None:
    class Cancelled(Exception):
        pass

    seen: list[StepProgress] = []

    def cancel_at_three(progress: StepProgress) -> None:
        seen.append(progress)
        if progress.done == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        pipe.generate_story(["a cat", "a cat in a box"], ["cat"], config=CONFIG, output_type="latent",
                            progress=cancel_at_three)
    assert len(seen) == 3
    # The pipeline is usable again afterwards: the method's processors were taken out.
    out = pipe.generate_story(["a cat", "a cat in a box"], ["cat"], config=CONFIG, output_type="latent")
    assert out.images.shape[0] == 2
