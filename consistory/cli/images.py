"""`--image` (a photo per anchor prompt) and `--control` (a ControlNet control per prompt) on the
command line: read and checked before any weights load, so a bad path is one line, not a
traceback after minutes of loading."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..loading import parse_preset

SKIP = "none"  # `--control none`: this prompt has no control (likewise `--image none`)


def add_image_options(parser: argparse.ArgumentParser, photos: bool) -> None:
    if photos:
        parser.add_argument("--image", action="append", metavar="PATH",
                            help="a photo of the subject for the anchor prompt in the same position (repeatable; "
                                 f"'{SKIP}' generates that anchor; anchors past the last --image are generated)")
    parser.add_argument("--control", action="append", metavar="PATH",
                        help="a ControlNet control image (pose, depth, edges) for the prompt in the same position "
                             f"(repeatable; '{SKIP}' for no control; prompts past the last --control have none)")
    parser.add_argument("--controlnet", metavar="ID",
                        help="the SDXL ControlNet for --control: a hub id, a local directory, or 'tiny' (a random "
                             "ControlNet built from a preset's UNet)")
    parser.add_argument("--control-scale", type=float, default=1.0, metavar="X",
                        help="ControlNet conditioning scale (default 1.0)")


def read_image(path: str, option: str):
    """The image at `path` as RGB, or a UsageError that says what is wrong with it."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"{option} {path}: no such file")
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UsageError(f"{option} {path}: not an image this tool can read ({error})") from None


def _per_prompt(paths: list[str] | None, n: int, option: str, what: str) -> list[Any] | None:
    if not paths:
        return None
    if len(paths) > n:
        raise UsageError(f"got {len(paths)} {option} for {n} {what}; give at most one per {what.rstrip('s')}")
    images = [None if p.lower() == SKIP else read_image(p, option) for p in paths]
    images += [None] * (n - len(images))
    return images if any(image is not None for image in images) else None


def anchor_photos(args: argparse.Namespace, n_anchors: int) -> list[Any] | None:
    """One entry per anchor prompt (PIL image or None), or None when no --image was given."""
    return _per_prompt(getattr(args, "image", None), n_anchors, "--image", "anchor prompts")


def control_images(args: argparse.Namespace, n_prompts: int) -> list[Any] | None:
    controls = _per_prompt(args.control, n_prompts, "--control", "prompts")
    if controls is not None and not args.controlnet:
        raise UsageError("--control needs --controlnet: an SDXL ControlNet hub id, a local directory, or 'tiny' "
                         "for a random one on a preset model")
    if args.controlnet and parse_preset(args.controlnet) is None and Path(args.controlnet).expanduser().exists():
        if not (Path(args.controlnet).expanduser() / "config.json").is_file():
            raise UsageError(f"--controlnet {args.controlnet}: the directory holds no ControlNet (no config.json)")
    return controls


def image_record(args: argparse.Namespace) -> dict[str, Any]:
    """What the JSON record says about the images given with the prompts."""
    record: dict[str, Any] = {}
    if getattr(args, "image", None):
        record["images"] = [None if p.lower() == SKIP else str(Path(p).resolve()) for p in args.image]
    if args.control:
        record["controls"] = [None if p.lower() == SKIP else str(Path(p).resolve()) for p in args.control]
        record.update(controlnet=args.controlnet, control_scale=args.control_scale)
    return record
