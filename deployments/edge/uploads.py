"""Images a request uploads: photo anchors (`images`) and ControlNet controls (`controls`).

Each arrives as base64 PNG or JPEG (a `data:image/...;base64,` prefix is accepted too). The
Ingress decodes and checks them here, off the event loop, before any model is called: the count
(one per anchor prompt, or one per prompt), the bytes and pixels against the configured limits,
the geometry against the size of the images the request makes (the library's rule: an aspect
ratio within 8:1, and not resized past 16 times the image's pixels, which a 1 x 16384 strip
would be; checked from the header, before the pixels are decoded), and that the bytes are a
whole PNG or JPEG. What goes on to the model replicas is PNG bytes of
the RGB image, which they open with `images.open_png`: lossless, so the replicas see exactly the
pixels the Ingress decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Optional, Sequence

from consistory.errors import InputError
from consistory.inputs.image_inputs import check_image_geometry

from ..errors import too_large, unprocessable
from ..flow.plans import Uploads
from ..messages import DEFAULT_CONTROL_SCALE, Pngs
from ..settings import ServiceSettings

FORMATS = ("PNG", "JPEG")


def _raw_bytes(where: str, text: str, max_bytes: int) -> bytes:
    if text.startswith("data:"):
        head, comma, rest = text.partition(",")
        if not comma or not head.endswith(";base64"):
            raise unprocessable(f"{where} is a data URL without ';base64,'; send the image's bytes in base64")
        text = rest
    # 4 base64 characters per 3 bytes: refuse before decoding anything too large.
    if (len(text) // 4) * 3 > max_bytes + 3:
        raise too_large(f"{where} is larger than the limit of {max_bytes} bytes per image; send a smaller image")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise unprocessable(f"{where} is not valid base64; encode the PNG or JPEG file with e.g. `base64 -w0 photo.png`") from None
    if len(data) > max_bytes:
        raise too_large(f"{where} has {len(data)} bytes; the limit is {max_bytes} bytes per image")
    if not data:
        raise unprocessable(f"{where} is empty; send a PNG or JPEG in base64, or null for none")
    return data


def decode_image(where: str, text: str, settings: ServiceSettings, size: tuple[int, int]) -> bytes:
    """The uploaded image as PNG bytes of its RGB pixels, or a 4xx saying what is wrong.
    `size`: (height, width) of the images the request makes."""
    from PIL import Image, UnidentifiedImageError

    limits = settings.limits
    data = _raw_bytes(where, text, limits.max_image_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                width, height = image.size
                if width * height > limits.max_image_pixels:
                    raise too_large(f"{where} is {width}x{height} pixels; the limit is {limits.max_image_pixels} "
                                    "pixels (width x height) per image")
                try:
                    check_image_geometry(width, height, *size, what=where)
                except InputError as error:
                    raise unprocessable(str(error)) from None
                rgb = image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_large(f"{where} has more pixels than the limit of {limits.max_image_pixels} per image") from None
    except UnidentifiedImageError:
        raise unprocessable(f"{where} is not a PNG or JPEG image; send one of those, base64-encoded") from None
    except (OSError, ValueError, SyntaxError) as error:  # truncated or damaged files
        raise unprocessable(f"{where} could not be decoded as an image ({str(error)[:200]}); send a whole PNG or JPEG") from None
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _decode_list(field: str, entries: Optional[Sequence[Optional[str]]], count: int, what: str,
                 settings: ServiceSettings, size: tuple[int, int]) -> Optional[Pngs]:
    if entries is None:
        return None
    if len(entries) != count:
        raise unprocessable(f"got {len(entries)} {field} for {count} {what}; give one per {what.rstrip('s')} "
                            "(null where there is none)")
    decoded = tuple(None if text is None else decode_image(f"{field}[{i}]", text, settings, size)
                    for i, text in enumerate(entries))
    return decoded if any(d is not None for d in decoded) else None


def check_controlnet(body, settings: ServiceSettings) -> None:
    if settings.controlnet is None and (getattr(body, "controls", None) is not None
                                        or getattr(body, "controlnet_conditioning_scale", None) is not None):
        raise unprocessable("this service has no ControlNet configured, so it takes no 'controls' or "
                            "'controlnet_conditioning_scale'; leave them out (an operator sets 'controlnet' "
                            "in the service settings)")


def decode_uploads(body, n_anchors: int, settings: ServiceSettings, size: tuple[int, int]) -> Uploads:
    """The request's photos (one per anchor prompt) and controls (one per prompt), decoded.
    `body` is a StoryRequest, SubjectRequest or ImagesRequest (the last has no photos); `size`:
    (height, width) of the images it makes."""
    check_controlnet(body, settings)
    photos = _decode_list("images", getattr(body, "images", None), n_anchors, "anchor prompts", settings, size)
    controls = _decode_list("controls", body.controls, len(body.prompts), "prompts", settings, size)
    scale = body.controlnet_conditioning_scale
    return Uploads(photos, controls, DEFAULT_CONTROL_SCALE if scale is None else scale)
