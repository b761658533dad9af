"""Each story of a spec made ready to run: its ConsiStoryConfig, its key, and its input checked.

Everything here is checked in the driver, before any model actor starts, so a bad story costs a
line in the manifest and no GPU time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass

from consistory.config import ConsiStoryConfig
from consistory.errors import InputError
from consistory.method.subject_tokens import find_subject_tokens

from .specs import SpecProblem, StorySpec


@dataclass(frozen=True)
class StoryPlan:
    spec: StorySpec
    config: ConsiStoryConfig
    key: str  # the settings that shape the images, hashed: a rerun skips a story whose key it has

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def seeds(self) -> list[int]:
        return [self.spec.seed + i for i in range(len(self.spec.prompts))]  # the library's rule

    @property
    def n_anchors(self) -> int:
        return min(self.config.n_anchors, len(self.spec.prompts))


def story_key(model: str, dtype: str, spec: StorySpec, config: ConsiStoryConfig) -> str:
    """Everything that decides a story's pixels: model, dtype, prompts, subjects, seed, config.

    Not the story id, the batch mode or the actor count: `--mode anchors` gives the images of
    `--mode story` (new images from a cache equal the one-batch story's)."""
    shaping = {"model": model, "dtype": dtype, "prompts": list(spec.prompts), "subjects": list(spec.subjects),
               "seed": spec.seed, "config": config.to_dict()}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def plan_stories(specs: list[StorySpec], args: argparse.Namespace, model: str, dtype: str,
                 tokenizer) -> tuple[list[StoryPlan], list[SpecProblem]]:
    """Plans for the stories that can run; a problem for each that cannot, saying what to fix.

    `tokenizer` is the model's first tokenizer (None where it cannot be read before the model
    loads; the actors then report prompts without their subject)."""
    from consistory.cli.options import build_config

    plans, problems = [], []
    for spec in specs:
        try:
            config = build_config(args, model, **spec.config_values)
            asked = spec.config_values.get("n_anchors", args.n_anchors)
            if asked is None:  # the rule of every surface: the default, or all prompts if fewer
                config = config.replace(n_anchors=min(config.n_anchors, len(spec.prompts)))
            elif (config.sdsa or config.feature_injection) and asked > len(spec.prompts):
                raise InputError(f"n_anchors is {asked} but the story has {len(spec.prompts)} prompt(s); "
                                 "the first n_anchors prompts are the anchors: add prompts, or set \"n_anchors\" "
                                 f"to {len(spec.prompts)} for this story (or --n-anchors for all)")
            if tokenizer is not None:
                find_subject_tokens(tokenizer, spec.prompts, spec.subjects)
        except InputError as error:
            problems.append(SpecProblem(spec.id, spec.source, f"{spec.source}: {error}"))
            continue
        plans.append(StoryPlan(spec, config, story_key(model, dtype, spec, config)))
    return plans, problems
