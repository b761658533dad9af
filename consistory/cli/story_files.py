"""A story on disk: one PNG per prompt, a grid of them all, and a JSON manifest written last.

The manifest is the only file that says a run finished. It is removed before any image is
written and put back (temp file + rename) only after every file it names exists, so a run that
fails half-way never leaves a manifest pointing at missing or stale images.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

GRID_NAME = "grid.png"
MAX_GRID_ROW = 6  # up to this many images sit in one row; more are laid out near-square


def image_names(count: int) -> list[str]:
    """`00.png`, `01.png`, ... zero-padded to at least two digits, in prompt order."""
    width = max(2, len(str(max(count - 1, 0))))
    return [f"{i:0{width}d}.png" for i in range(count)]


def make_grid(images: Sequence[Image.Image], columns: int | None = None, gap: int = 0) -> Image.Image:
    """The images in reading order on a white sheet; cells are the size of the largest image."""
    if not images:
        raise ValueError("a grid needs at least one image")
    n = len(images)
    columns = columns or (n if n <= MAX_GRID_ROW else math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    sheet = Image.new("RGB", (columns * cell_w + (columns - 1) * gap, rows * cell_h + (rows - 1) * gap), "white")
    for i, im in enumerate(images):
        row, col = divmod(i, columns)
        sheet.paste(im.convert("RGB"), (col * (cell_w + gap), row * (cell_h + gap)))
    return sheet


def _write_atomic(path: Path, write: Callable[[Any], None], binary: bool = True) -> Path:
    """Write through a temp file in the same directory, then rename over `path`.

    The temp file is opened with `open` (not `mkstemp`, which makes it 0600) so the result gets
    the usual umask permissions, like any other file the user writes.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb" if binary else "x") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_png(image: Image.Image, path: str | os.PathLike) -> Path:
    return _write_atomic(Path(path), lambda f: image.save(f, format="PNG"))


def write_json(data: dict[str, Any], path: str | os.PathLike) -> Path:
    text = json.dumps(data, indent=2) + "\n"
    return _write_atomic(Path(path), lambda f: f.write(text), binary=False)


def begin_story_dir(out_dir: str | os.PathLike, manifest_name: str) -> Path:
    """Create `out_dir` and drop an earlier run's manifest before any image is overwritten."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / manifest_name).unlink(missing_ok=True)
    return out


def write_images(out_dir: Path, images: Sequence[Image.Image]) -> list[str]:
    """Each image as a PNG plus the grid; returns the image file names in prompt order."""
    names = image_names(len(images))
    for name, image in zip(names, images):
        write_png(image, out_dir / name)
    write_png(make_grid(images), out_dir / GRID_NAME)
    return names
