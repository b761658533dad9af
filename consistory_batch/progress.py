"""The batch's progress bar: images made out of images to make, with stories and failures.

On a terminal it redraws on every event and at least once a second; where stderr is a log
(`ray job submit`, a file) it writes a line at most every LOG_EVERY_S seconds instead.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

REFRESH_S = 1.0  # the elapsed time keeps moving while the actors load or work on long stories
LOG_EVERY_S = 30.0


class BatchProgress:
    def __init__(self, stories: int, images: int, actors: int, enabled: bool = True) -> None:
        self.stories, self.finished, self.failed = stories, 0, 0
        self.actors, self.ready = actors, 0
        self.every_s = REFRESH_S if sys.stderr.isatty() else LOG_EVERY_S
        self.bar = tqdm(total=images, unit="image", disable=not enabled, dynamic_ncols=True, mininterval=self.every_s)
        self._refreshed = time.monotonic()
        self._describe()

    def _describe(self) -> None:
        if self.ready == 0:  # nothing can move before a model is loaded: say so
            text = f"loading the model ({self.actors} actor{'s' if self.actors > 1 else ''})"
        else:
            failed = f", {self.failed} failed" if self.failed else ""
            text = f"stories {self.finished}/{self.stories}{failed}"
        self.bar.set_description(text, refresh=False)
        self._refresh(force=self.every_s == REFRESH_S)

    def _refresh(self, force: bool = False) -> None:
        if force or time.monotonic() - self._refreshed >= self.every_s:
            self._refreshed = time.monotonic()
            self.bar.refresh()

    def actor_ready(self) -> None:
        self.ready += 1
        self._describe()

    def images_done(self, count: int) -> None:
        self.bar.update(count)

    def story_done(self) -> None:
        self.finished += 1
        self._describe()

    def story_failed(self, images_not_made: int) -> None:
        self.failed += 1
        self.bar.total -= images_not_made  # so that the bar still ends at 100%
        self._describe()

    def tick(self) -> None:
        self._refresh()

    def close(self) -> None:
        self.bar.close()
