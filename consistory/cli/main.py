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
import sys
from typing import Sequence

from ..errors import InputError, UsageError
from ..hub_access import ModelUnavailable
from .arguments import (
    add_model_option,
    add_n_anchors_option,
    add_prompt_options,
    add_run_options,
    add_sampling_options,
    add_subject_option,
    seed_value,
)
from .images import add_image_options


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"consistory: error: {message} (see `{self.prog} --help`)\n")


def _say(message: str) -> None:
    print(f"consistory: {message}", file=sys.stderr, flush=True)


def _generate(args: argparse.Namespace) -> int:
    from .commands import cmd_generate  # torch and diffusers load only once a command runs

    return cmd_generate(args)


def _anchors(args: argparse.Namespace) -> int:
    from .commands import cmd_anchors

    return cmd_anchors(args)


def _extend(args: argparse.Namespace) -> int:
    from .commands import cmd_extend

    return cmd_extend(args)


def _plugin_commands(commands) -> None:
    """Commands other packages add (`consistory batch` and `eval` come from `consistory_batch`),
    through the entry point group `consistory.commands`: each entry is a function that adds its
    subparsers."""
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group="consistory.commands"), key=lambda e: e.name):
        entry.load()(commands)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="consistory", description="Training-free consistent-subject image generation on SDXL.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    first_seed = "seed of the first image; image i gets seed + i"

    generate = commands.add_parser("generate", help="generate a story in one batch (the first images are the anchors)")
    add_subject_option(generate)
    add_sampling_options(generate, first_seed)
    add_n_anchors_option(generate, "of the story")
    add_prompt_options(generate)
    add_image_options(generate, photos=True)
    add_run_options(generate, "story/")
    generate.set_defaults(run=_generate)

    anchors = commands.add_parser("anchors", help="generate anchor images and save their anchor cache")
    add_subject_option(anchors)
    add_sampling_options(anchors, first_seed)
    add_prompt_options(anchors)
    anchors.add_argument("--save", required=True, metavar="PATH", help="where to write the anchor cache")
    anchors.add_argument("--codec", choices=("exact", "compact"), default="exact",
                         help="exact: every tensor as computed; compact: 8 bits or fewer per value, "
                              "about 1/6 of the bytes (default exact)")
    add_image_options(anchors, photos=True)
    add_run_options(anchors, "anchors/")
    anchors.set_defaults(run=_anchors)

    extend = commands.add_parser("extend", help="new images of a cached subject (size and steps come from the cache)")
    extend.add_argument("cache", help="an anchor cache written by `consistory anchors`")
    extend.add_argument("--model", help="the model the cache was made with (default: the one it records)")
    extend.add_argument("--seed", type=seed_value, action="append",
                        help="one per prompt (repeatable); default: continue the anchors' seeds")
    add_prompt_options(extend)
    add_image_options(extend, photos=False)
    add_run_options(extend, "extend/")
    extend.set_defaults(run=_extend)

    _plugin_commands(commands)
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
