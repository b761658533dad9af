"""From command-line options to prompts and a ConsiStoryConfig, checked before any weights load.

Light on purpose (no torch): `consistory generate`, `anchors`, `extend` and `batch` all read
their sampling options through here.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..config import ConsiStoryConfig
from ..errors import UsageError
from ..loading import sampling_defaults
from .prompt_text import setting_prompt

DEFAULT_STYLE = "A photo of"  # the reference tool's prompt prefix (docs/method.md section 10)


def story_prompts(args: argparse.Namespace, subject: str) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    if args.settings:
        return [setting_prompt(args.style, subject, setting) for setting in args.settings]
    raise UsageError("no prompts: give --prompt (repeatable), or --settings with an optional --style")


def build_config(args: argparse.Namespace, model: str, **story_values: Any) -> ConsiStoryConfig:
    """The model's sampling defaults, then the command line's options, then `story_values`
    (a batch story's own settings, as ConsiStoryConfig field names)."""
    values: dict[str, Any] = sampling_defaults(model)
    given = dict(num_inference_steps=args.steps, height=args.height, width=args.width,
                 guidance_scale=args.guidance, n_anchors=getattr(args, "n_anchors", None))
    if args.width is None and args.height is not None:
        given["width"] = args.height
    values.update({k: v for k, v in given.items() if v is not None})
    switches = dict(sdsa=args.no_sdsa, query_mixing=args.no_query_mixing,
                    feature_injection=args.no_injection, freeu=args.no_freeu)
    values.update({k: not off for k, off in switches.items()})
    if "height" in story_values and "width" not in story_values and args.width is None:
        # As on the command line, a width left out follows the height: the story's, here,
        # unless the command line set a width of its own.
        story_values = {**story_values, "width": story_values["height"]}
    values.update(story_values)
    return ConsiStoryConfig(**values)


def story_anchors(config: ConsiStoryConfig, n_prompts: int, asked: int | None) -> ConsiStoryConfig:
    """The rule of every surface (command line, batch stories, HTTP): the first n_anchors prompts
    are the anchors; a story that does not say how many gets the default or all of its prompts,
    whichever is fewer, and one that asks for more anchors than prompts is refused."""
    if asked is None:
        return config.replace(n_anchors=min(config.n_anchors, n_prompts))
    if (config.sdsa or config.feature_injection) and asked > n_prompts:
        raise UsageError(
            f"{n_prompts} prompt(s) for {asked} anchors: the first --n-anchors prompts are the "
            f"anchors, so give at least {asked} prompts or --n-anchors {n_prompts}"
        )
    return config
