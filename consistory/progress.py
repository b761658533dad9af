"""Step-by-step progress of a generation, for callers that report it (the CLI's bar, the
service's jobs) without reading logs."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from tqdm.auto import tqdm


@dataclass(frozen=True)
class StepProgress:
    """One denoising step finished, for every image of the call at once."""

    pass_index: int  # 1, or 2 for the pass with feature injection
    step: int  # the step just finished, 0-based, of `steps`
    steps: int  # num_inference_steps, as the user set them
    done: int  # UNet steps finished in this call, both passes
    total: int  # UNet steps this call makes: pass 2 resumes at injection start, so < 2 * steps

    @property
    def fraction(self) -> float:
        return self.done / self.total


# Called after each step on the thread that generates. An exception raised by it stops the
# generation and propagates to the caller: that is how a caller cancels work in progress.
ProgressCallback = Callable[[StepProgress], None]


@contextmanager
def step_progress(show: bool, config, resume_at: int | None, state, callback: ProgressCallback | None):
    """A callback for the denoising loop that moves the progress bar (when `show`) and calls
    `callback` after each UNet step of either pass."""
    steps = config.num_inference_steps
    total = steps + (steps - (resume_at or 0) if config.two_passes else 0)
    passes = 2 if config.two_passes else 1
    # The bar counts each pass's steps as the user set them ("pass 2 of 2: 7/10"); pass 2
    # opens at the step it resumes from, since the steps before it were made once in pass 1.
    # Each pass gets a bar of its own: resetting one bar would draw it once more, empty and
    # still labelled with the pass that has just ended, before the next pass's first step.
    def open_bar(pass_index: int, initial: int):
        return tqdm(total=steps, initial=initial, desc=f"pass {pass_index} of {passes}", unit="step",
                    disable=not show, leave=False)

    bar = open_bar(1, 0)
    done, shown_pass = 0, 1

    def step_done(step: int) -> None:
        nonlocal bar, done, shown_pass
        done += 1
        if state.pass_index != shown_pass:
            shown_pass = state.pass_index
            bar.close()
            bar = open_bar(shown_pass, step)
        bar.update()
        if step == steps - 1:
            bar.refresh()  # a pass's last step is shown even when it came within tqdm's redraw interval
        if callback is not None:
            callback(StepProgress(state.pass_index, step, steps, done, total))

    try:
        yield step_done
    finally:
        bar.close()
