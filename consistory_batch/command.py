"""The `consistory batch` and `consistory eval` commands: their options, and how they run.

The command line finds them through the entry point group `consistory.commands`
(pyproject.toml), so the library's CLI never imports this package: the dependency runs one way,
from here to `consistory`. The modules that need Ray, boto3 or matplotlib load only when a
command runs; without them the command says which extra to install.

A destination that fails (an unreachable bucket, missing credentials, a full disk) ends the
command with one line saying so (exit status 1), not a traceback.
"""

from __future__ import annotations

import argparse
from typing import Callable

from consistory.cli.arguments import add_n_anchors_option, add_sampling_options, positive_float, positive_int
from consistory.errors import UsageError

# Packages only these commands need, and the extra that installs them.
_EXTRAS = {"ray": "batch", "yaml": "batch", "boto3": "batch", "botocore": "batch", "matplotlib": "batch"}


def _needing_extras(run: Callable[[argparse.Namespace], int], args: argparse.Namespace, dest: str) -> int:
    """Run a command; a missing optional package or a failing store is one line, not a traceback."""
    try:
        from deployments.artifact_store import ArtifactStoreError
    except ImportError as error:
        _missing(error, args)
    try:
        return run(args)
    except ImportError as error:
        _missing(error, args)
    except ArtifactStoreError as error:
        raise OSError(f"{dest}: the store failed: {error}") from None


def _missing(error: ImportError, args: argparse.Namespace):
    root = (error.name or "").split(".")[0]
    if root not in _EXTRAS:
        raise error
    raise UsageError(f"`consistory {args.command}` needs the package {root!r}: "
                     f"pip install 'consistory[{_EXTRAS[root]}]'") from None


def cmd_batch(args: argparse.Namespace) -> int:
    def run(a: argparse.Namespace) -> int:
        from .runner import run_batch

        return run_batch(a)

    return _needing_extras(run, args, args.out)


def cmd_eval(args: argparse.Namespace) -> int:
    def run(a: argparse.Namespace) -> int:
        from .evaluate import run_eval

        return run_eval(a)

    return _needing_extras(run, args, args.dest)


def add_batch_command(commands) -> None:
    """`consistory batch`, registered with the command line through the entry point group
    `consistory.commands` (pyproject.toml)."""
    batch = commands.add_parser(
        "batch", help="generate many stories on a pool of model actors (Ray), into a directory or s3://bucket/prefix",
        description="Stories from SPEC (JSONL, one story per line, or a ConsiStory+ YAML prompt set) on a pool "
                    "of model actors, one pipeline per GPU. Each story's images, grid.png and story.json go to "
                    "DEST/stories/<id>/, with DEST/manifest.json listing every story. Rerunning the same command "
                    "skips finished stories. Runs as a Ray job too: ray job submit -- consistory batch ...")
    batch.add_argument("spec", metavar="SPEC", help="stories: a .jsonl file, or a .yaml/.yml ConsiStory+ prompt set")
    batch.add_argument("--out", required=True, metavar="DEST", help="a local directory or s3://bucket/prefix")
    add_sampling_options(batch, "seed of stories that give none (every YAML story; JSONL lines without 'seed')")
    add_n_anchors_option(batch, "of a story")
    batch.add_argument("--mode", choices=("story", "anchors"), default="story",
                       help="story: each story in one batch on one actor (default); anchors: each story's anchors "
                            "once, then its other prompts from the anchor cache, spread over the actors")
    batch.add_argument("--extend-batch", type=positive_int, default=4, metavar="N",
                       help="--mode anchors: new images per actor call (default 4)")
    batch.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: cuda where the Ray cluster has GPUs (one per actor)")
    batch.add_argument("--actors", type=positive_int,
                       help="model actors (default: one per GPU in the Ray cluster, or 1 without GPUs)")
    batch.add_argument("--cpus-per-actor", type=positive_float, default=1.0, metavar="N",
                       help="Ray CPUs reserved per actor; fractions allowed (default 1)")
    batch.add_argument("--torch-threads", type=positive_int, metavar="N",
                       help="torch threads per actor (default: --cpus-per-actor rounded down, at least 1)")
    batch.add_argument("--attempts", type=positive_int, default=3, metavar="N",
                       help="tries per story when its actor dies or fails (default 3); bad input is never retried")
    batch.add_argument("--address", metavar="ADDRESS",
                       help="the Ray cluster (default: RAY_ADDRESS, as under `ray job submit`, else a local Ray)")
    batch.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    batch.set_defaults(run=cmd_batch)


def add_eval_command(commands) -> None:
    """`consistory eval`, registered like `batch`."""
    evaluate = commands.add_parser(
        "eval", help="score a finished batch: prompt alignment and subject consistency, per story and overall",
        description="Prompt alignment: CLIP image-text cosine against each prompt's setting. Subject consistency: "
                    "mean pairwise DreamSim similarity (1 - distance) between a story's images where the dreamsim "
                    "package and its weights are present, else CLIP image-image cosine; the report names which. "
                    "Writes eval/scores.json and eval/scatter.png (consistency against alignment) to DEST.")
    evaluate.add_argument("dest", metavar="DEST", help="what `consistory batch --out` wrote: a directory or s3://bucket/prefix")
    evaluate.add_argument("--clip", default="openai/clip-vit-large-patch14",
                          help="a CLIP checkpoint: hub id or local directory (default openai/clip-vit-large-patch14), "
                               "or 'tiny': a random CLIP built locally, for offline smoke runs (scores mean nothing)")
    evaluate.add_argument("--consistency", choices=("auto", "dreamsim", "clip"), default="auto",
                          help="auto: DreamSim where installed with its weights, else CLIP image cosine")
    evaluate.add_argument("--dreamsim-cache", metavar="DIR",
                          help="where DreamSim's weights are (default: the dreamsim package's ./models)")
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    evaluate.add_argument("--report", metavar="DIR",
                          help="write scores.json and scatter.png to this local directory instead of DEST/eval/")
    evaluate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    evaluate.set_defaults(run=cmd_eval)
