"""A story's files in DEST: its PNGs, its grid and its story.json (written last).

Used by the model actors (which write what they make) and by the finishing task of
`--mode anchors`, where a story's images come from several actors and the grid and the record
are written once all of them are stored.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

from PIL import Image

from consistory.cli.story_files import GRID_NAME, image_names, make_grid

from .destination import STORY_RECORD, Destination, story_file, write_json
from .plans import StoryPlan


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def file_names(plan: StoryPlan) -> list[str]:
    return image_names(len(plan.spec.prompts))


def write_images(store, plan: StoryPlan, images: Sequence[Image.Image], indices: Sequence[int]) -> list[str]:
    """Image i of `indices` under its prompt's file name; returns those names."""
    names = file_names(plan)
    for image, index in zip(images, indices):
        store.put(story_file(plan.id, names[index]), png_bytes(image), "image/png")
    return [names[i] for i in indices]


def story_record(plan: StoryPlan, model: str, dtype: str, mode: str, timings: dict[str, float]) -> dict[str, Any]:
    spec = plan.spec
    return {
        "id": plan.id,
        "key": plan.key,
        "source": spec.source,
        "model": model,
        "dtype": dtype,
        "mode": mode,
        "subjects": list(spec.subjects),
        "prompts": list(spec.prompts),
        "seeds": plan.seeds,
        "n_anchors": plan.n_anchors,
        "alignment_texts": list(spec.alignment_texts),
        "alignment_source": spec.alignment_source,
        "config": plan.config.to_dict(),
        "files": file_names(plan),
        "grid": GRID_NAME,
        "timings": timings,
    }


def write_story(store, images: Sequence[Image.Image], record: dict[str, Any]) -> None:
    """The grid, then story.json: the record is what says the story is finished."""
    store.put(story_file(record["id"], GRID_NAME), png_bytes(make_grid(list(images))), "image/png")
    write_json(store, story_file(record["id"], STORY_RECORD), record)


def finish_story(destination: Destination, record: dict[str, Any]) -> dict[str, Any]:
    """`--mode anchors`: read back the story's images (made by several actors), then write the
    grid and story.json. Runs as a Ray task next to the actors."""
    store = destination.open()
    images = [Image.open(io.BytesIO(store.get(story_file(record["id"], name)))) for name in record["files"]]
    write_story(store, images, record)
    return record
