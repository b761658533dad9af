"""The batch's progress bar: images made out of images to make, with stories and failures."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

REFRESH_S = 1.0  # the elapsed time keeps moving while the actors load or work on long stories


class BatchProgress:
    def __init__(self, stories: int, images: int, actors: int, enabled: bool = True) -> None:
        self.stories, self.finished, self.failed = stories, 0, 0
        self.actors, self.ready = actors, 0
        self.bar = tqdm(total=images, unit="image", disable=not enabled, dynamic_ncols=True)
        self._refreshed = time.monotonic()
        self._describe()

    def _describe(self) -> None:
        if self.ready == 0:  # nothing can move before a model is loaded: say so
            text = f"loading the model ({self.actors} actor{'s' if self.actors > 1 else ''})"
        else:
            failed = f", {self.failed} failed" if self.failed else ""
            text = f"stories {self.finished}/{self.stories}{failed}"
        self.bar.set_description(text, refresh=False)

    def actor_ready(self) -> None:
        self.ready += 1
        self._describe()
        self.bar.refresh()

    def images_done(self, count: int) -> None:
        self.bar.update(count)

    def story_done(self) -> None:
        self.finished += 1
        self._describe()
        self.bar.refresh()

    def story_failed(self, images_not_made: int) -> None:
        self.failed += 1
        self.bar.total -= images_not_made  # so that the bar still ends at 100%
        self._describe()
        self.bar.refresh()

    def tick(self) -> None:
        if time.monotonic() - self._refreshed >= REFRESH_S:
            self._refreshed = time.monotonic()
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
