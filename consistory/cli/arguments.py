"""Command-line options that several commands share (the library's `generate`, `anchors`,
`extend` and the batch package's `batch`): argument types and option groups. Light on purpose:
no torch, diffusers or Ray."""

from __future__ import annotations

import argparse

from ..loading import DEFAULT_MODEL, PRESETS
from ..seeds import MAX_SEED
from .options import DEFAULT_STYLE


def seed_value(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seeds are integers in [0, 2**63 - 1] (got {text})")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {text})")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0 (got {text})")
    return value


def add_prompt_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt naming the subject (repeatable)")
    group.add_argument("--settings", action="append", metavar="TEXT",
                       help="a setting; the prompt is STYLE, the first subject (with 'a' or 'an' where it needs "
                            "one) and the setting: 'A photo of a dog in the park' (repeatable)")
    parser.add_argument("--style", default=DEFAULT_STYLE,
                        help=f"the words before the subject in --settings prompts (default {DEFAULT_STYLE!r}); "
                             "end it with an article ('A photo of the') to choose the article yourself")


def add_run_options(parser: argparse.ArgumentParser, out_default: str) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available (real weights then run in fp16)")
    parser.add_argument("--out", default=out_default, metavar="DIR", help=f"output directory (default {out_default})")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--compile", action="store_true",
                        help="run the UNet under torch.compile (CUDA graphs on a GPU); the first generation "
                             "compiles for minutes, so it pays only in long runs on a GPU")


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"an SDXL hub id or local directory (default {DEFAULT_MODEL}), "
                        f"or a random-weight preset for offline runs: {', '.join(PRESETS)}")


def add_sampling_options(parser: argparse.ArgumentParser, seed_help: str) -> None:
    add_model_option(parser)
    parser.add_argument("--seed", type=seed_value, default=0, help=seed_help)
    parser.add_argument("--steps", type=positive_int, help="denoising steps (default 50; tiny 10, small 20)")
    parser.add_argument("--height", type=int, help="image height, a multiple of 8 (default 1024; tiny 128, small 256)")
    parser.add_argument("--width", type=int, help="image width, a multiple of 8 (default as --height)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 5.0)")
    for name, what in (("sdsa", "shared self-attention"), ("query-mixing", "vanilla query mixing"),
                       ("injection", "feature injection"), ("freeu", "FreeU")):
        parser.add_argument(f"--no-{name}", action="store_true", help=f"turn {what} off")


def add_subject_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subject", action="append", required=True,
                        help="the subject word or phrase (repeatable); its plural in a prompt counts too")


def add_n_anchors_option(parser: argparse.ArgumentParser, scope: str) -> None:
    parser.add_argument("--n-anchors", type=positive_int,
                        help=f"how many of the first images {scope} are anchors (default 2)")
