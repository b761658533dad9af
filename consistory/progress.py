"""Step-by-step progress of a generation, for callers that report it (the CLI's bar, the
service's jobs) without reading logs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


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
