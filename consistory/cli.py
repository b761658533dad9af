"""`consistory` command line: generate a story, create anchors, extend a story from its anchors,
run a batch of stories on a Ray cluster, and score a finished batch.

    consistory generate --subject dog --settings "in the park" --settings "at the beach"
    consistory generate --model tiny --subject dog --prompt "a dog" --prompt "a dog swimming"  # CPU smoke run
    consistory anchors  --subject dog --prompt "a dog running" --prompt "a dog asleep" --save dog.cache
    consistory extend   dog.cache --prompt "a dog on a boat"
    consistory batch    stories.jsonl --out s3://bucket/run1 --model tiny --steps 2 --height 64
    consistory eval     s3://bucket/run1 --clip tiny

Exit status: 0 on success; 2 when the command line or its inputs are wrong (bad option, invalid
size, a prompt without the subject, a missing or unusable cache file, an unknown model path);
1 when something fails while running (a model that cannot be had, weights that cannot be
loaded, a disk or GPU error). Every failure is a single `consistory: error: ...` line on stderr.

This module stays light (no torch, diffusers or Ray): each command imports what it needs when
it runs, so `--help` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from .cli_images import add_image_options
from .cli_options import DEFAULT_STYLE
from .errors import InputError, UsageError
from .hub_access import ModelUnavailable
from .model_ids import DEFAULT_MODEL, PRESETS
from .seeds import MAX_SEED

# Packages only some commands need, and the extra that installs them.
_EXTRAS = {"ray": "batch", "yaml": "batch", "boto3": "batch", "botocore": "batch", "matplotlib": "batch"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"consistory: error: {message} (see `{self.prog} --help`)\n")


def _say(message: str) -> None:
    print(f"consistory: {message}", file=sys.stderr, flush=True)


def _command(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A command whose module (and its heavy imports) loads only when the command runs."""

    def run(args: argparse.Namespace) -> int:
        try:
            target = getattr(importlib.import_module(module), name)
        except ImportError as error:
            root = (error.name or "").split(".")[0]
            if root not in _EXTRAS:
                raise
            raise UsageError(f"`consistory {args.command}` needs the package {root!r}: "
                             f"pip install 'consistory[{_EXTRAS[root]}]'") from None
        return target(args)

    return run


# --- parsing ---
def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seeds are integers in [0, 2**63 - 1] (got {text})")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {text})")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0 (got {text})")
    return value


def _prompt_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt naming the subject (repeatable)")
    group.add_argument("--settings", action="append", metavar="TEXT",
                       help="a setting; the prompt is STYLE, the first subject (with 'a' or 'an' where it needs "
                            "one) and the setting: 'A photo of a dog in the park' (repeatable)")
    parser.add_argument("--style", default=DEFAULT_STYLE,
                        help=f"the words before the subject in --settings prompts (default {DEFAULT_STYLE!r}); "
                             "end it with an article ('A photo of the') to choose the article yourself")


def _run_options(parser: argparse.ArgumentParser, out_default: str) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available (real weights then run in fp16)")
    parser.add_argument("--out", default=out_default, metavar="DIR", help=f"output directory (default {out_default})")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"an SDXL hub id or local directory (default {DEFAULT_MODEL}), "
                        f"or a random-weight preset for offline runs: {', '.join(PRESETS)}")


def _sampling_options(parser: argparse.ArgumentParser, seed_help: str) -> None:
    _model_option(parser)
    parser.add_argument("--seed", type=_seed, default=0, help=seed_help)
    parser.add_argument("--steps", type=_positive, help="denoising steps (default 50; tiny 10, small 20)")
    parser.add_argument("--height", type=int, help="image height, a multiple of 8 (default 1024; tiny 128, small 256)")
    parser.add_argument("--width", type=int, help="image width, a multiple of 8 (default as --height)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 5.0)")
    for name, what in (("sdsa", "shared self-attention"), ("query-mixing", "vanilla query mixing"),
                       ("injection", "feature injection"), ("freeu", "FreeU")):
        parser.add_argument(f"--no-{name}", action="store_true", help=f"turn {what} off")


def _subject_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subject", action="append", required=True,
                        help="the subject word or phrase (repeatable); its plural in a prompt counts too")


def _n_anchors_option(parser: argparse.ArgumentParser, scope: str) -> None:
    parser.add_argument("--n-anchors", type=_positive,
                        help=f"how many of the first images {scope} are anchors (default 2)")


def _batch_parser(commands) -> None:
    batch = commands.add_parser(
        "batch", help="generate many stories on a pool of model actors (Ray), into a directory or s3://bucket/prefix",
        description="Stories from SPEC (JSONL, one story per line, or a ConsiStory+ YAML prompt set) on a pool "
                    "of model actors, one pipeline per GPU. Each story's images, grid.png and story.json go to "
                    "DEST/stories/<id>/, with DEST/manifest.json listing every story. Rerunning the same command "
                    "skips finished stories. Runs as a Ray job too: ray job submit -- consistory batch ...")
    batch.add_argument("spec", metavar="SPEC", help="stories: a .jsonl file, or a .yaml/.yml ConsiStory+ prompt set")
    batch.add_argument("--out", required=True, metavar="DEST", help="a local directory or s3://bucket/prefix")
    _sampling_options(batch, "seed of stories that give none (every YAML story; JSONL lines without 'seed')")
    _n_anchors_option(batch, "of a story")
    batch.add_argument("--mode", choices=("story", "anchors"), default="story",
                       help="story: each story in one batch on one actor (default); anchors: each story's anchors "
                            "once, then its other prompts from the anchor cache, spread over the actors")
    batch.add_argument("--extend-batch", type=_positive, default=4, metavar="N",
                       help="--mode anchors: new images per actor call (default 4)")
    batch.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: cuda where the Ray cluster has GPUs (one per actor)")
    batch.add_argument("--actors", type=_positive,
                       help="model actors (default: one per GPU in the Ray cluster, or 1 without GPUs)")
    batch.add_argument("--cpus-per-actor", type=_positive_float, default=1.0, metavar="N",
                       help="Ray CPUs reserved per actor; fractions allowed (default 1)")
    batch.add_argument("--torch-threads", type=_positive, metavar="N",
                       help="torch threads per actor (default: --cpus-per-actor rounded down, at least 1)")
    batch.add_argument("--attempts", type=_positive, default=3, metavar="N",
                       help="tries per story when its actor dies or fails (default 3); bad input is never retried")
    batch.add_argument("--address", metavar="ADDRESS",
                       help="the Ray cluster (default: RAY_ADDRESS, as under `ray job submit`, else a local Ray)")
    batch.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    batch.set_defaults(run=_command("consistory_batch.command", "cmd_batch"))


def _eval_parser(commands) -> None:
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
    evaluate.set_defaults(run=_command("consistory_batch.command", "cmd_eval"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="consistory", description="Training-free consistent-subject image generation on SDXL.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    first_seed = "seed of the first image; image i gets seed + i"

    generate = commands.add_parser("generate", help="generate a story in one batch (the first images are the anchors)")
    _subject_option(generate)
    _sampling_options(generate, first_seed)
    _n_anchors_option(generate, "of the story")
    _prompt_options(generate)
    add_image_options(generate, photos=True)
    _run_options(generate, "story/")
    generate.set_defaults(run=_command("consistory.cli_commands", "cmd_generate"))

    anchors = commands.add_parser("anchors", help="generate anchor images and save their anchor cache")
    _subject_option(anchors)
    _sampling_options(anchors, first_seed)
    _prompt_options(anchors)
    anchors.add_argument("--save", required=True, metavar="PATH", help="where to write the anchor cache")
    anchors.add_argument("--codec", choices=("exact", "compact"), default="exact",
                         help="exact: every tensor as computed; compact: 8 bits or fewer per value, "
                              "about 1/6 of the bytes (default exact)")
    add_image_options(anchors, photos=True)
    _run_options(anchors, "anchors/")
    anchors.set_defaults(run=_command("consistory.cli_commands", "cmd_anchors"))

    extend = commands.add_parser("extend", help="new images of a cached subject (size and steps come from the cache)")
    extend.add_argument("cache", help="an anchor cache written by `consistory anchors`")
    extend.add_argument("--model", help="the model the cache was made with (default: the one it records)")
    extend.add_argument("--seed", type=_seed, action="append",
                        help="one per prompt (repeatable); default: continue the anchors' seeds")
    _prompt_options(extend)
    add_image_options(extend, photos=False)
    _run_options(extend, "extend/")
    extend.set_defaults(run=_command("consistory.cli_commands", "cmd_extend"))

    _batch_parser(commands)
    _eval_parser(commands)
    return parser


# --- entry point ---
def _fail(error: BaseException | str, code: int) -> int:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    _say("error: " + (" ".join(lines) or type(error).__name__))
    return code


def _out_of_gpu_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")  # only a run that loaded torch can run out of GPU memory
    return torch is not None and isinstance(error, torch.cuda.OutOfMemoryError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed
        return done.code if isinstance(done.code, int) else 0
    from .log_filters import quiet_library_warnings

    quiet_library_warnings()
    try:
        return args.run(args)
    except (UsageError, InputError, FileNotFoundError) as error:
        return _fail(error, 2)
    except ModelUnavailable as error:
        return _fail(error, 1)
    except (OSError, ValueError, RuntimeError) as error:
        if _out_of_gpu_memory(error):
            return _fail(f"out of GPU memory ({error}); try fewer prompts or a smaller size", 1)
        if isinstance(error, RuntimeError):
            raise  # a fault of the program, not of the input: keep its traceback
        return _fail(error, 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
