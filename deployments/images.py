"""PNG bytes in and out: the only image format the service stores and answers with."""

from __future__ import annotations

import base64
import io
from typing import Optional, Sequence

import numpy as np
from PIL import Image


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a PNG."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def to_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def from_b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def open_png(data: Optional[bytes]) -> Optional[Image.Image]:
    """PNG bytes as a PIL RGB image, for the pipeline (None stays None)."""
    if data is None:
        return None
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def open_pngs(items: Optional[Sequence[Optional[bytes]]]) -> Optional[list[Optional[Image.Image]]]:
    return None if items is None else [open_png(item) for item in items]
