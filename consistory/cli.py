"""`consistory` command line: generate a story, create anchors, extend a story from its anchors.

    consistory generate --subject dog --settings "in the park" --settings "at the beach"
    consistory generate --model tiny --subject dog --prompt "a dog" --prompt "a dog swimming"  # CPU smoke run
    consistory anchors  --subject dog --prompt "a dog running" --prompt "a dog asleep" --save dog.cache
    consistory extend   dog.cache --prompt "a dog on a boat"

Exit status: 0 on success; 2 when the command line or its inputs are wrong (bad option, invalid
size, a prompt without the subject, a missing or unusable cache file, an unknown model path);
1 when something fails while running (weights that cannot be loaded, a disk or GPU error).
Every failure is a single `consistory: error: ...` line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .anchor_cache import AnchorCache, AnchorCacheError
from .cli_models import (
    UsageError,
    _say,
    check_prompts,
    model_dtype,
    open_pipeline,
    preset_of,
    resolve_device,
    resolve_model,
)
from .config import ConsiStoryConfig
from .pipeline import ConsiStoryPipeline
from .presets import PRESETS
from .seeds import MAX_SEED
from .story_files import GRID_NAME, begin_story_dir, write_images, write_json

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"  # the published method's base model
DEFAULT_STYLE = "A photo of "  # the reference tool's prompt prefix (ALGORITHM.md section 10)
# Sampling defaults per preset, so a random-weight smoke run is quick on CPU; real weights and
# "full" keep the published defaults of ConsiStoryConfig (1024 px, 50 steps).
PRESET_SAMPLING: dict[str, dict[str, int]] = {
    "tiny": dict(height=128, width=128, num_inference_steps=10),
    "small": dict(height=256, width=256, num_inference_steps=20),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"consistory: error: {message} (see `{self.prog} --help`)\n")


# --- inputs ---
def story_prompts(args: argparse.Namespace, subject: str) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    if args.settings:
        return [f"{args.style}{subject} {setting}" for setting in args.settings]
    raise UsageError("no prompts: give --prompt (repeatable), or --settings with an optional --style")


def build_config(args: argparse.Namespace, model: str) -> ConsiStoryConfig:
    preset = preset_of(model)
    values: dict[str, Any] = dict(PRESET_SAMPLING.get(preset[0], {})) if preset else {}
    given = dict(num_inference_steps=args.steps, height=args.height, width=args.width,
                 guidance_scale=args.guidance, n_anchors=getattr(args, "n_anchors", None))
    if args.width is None and args.height is not None:
        given["width"] = args.height
    values.update({k: v for k, v in given.items() if v is not None})
    switches = dict(sdsa=args.no_sdsa, query_mixing=args.no_query_mixing,
                    feature_injection=args.no_injection, freeu=args.no_freeu)
    values.update({k: not off for k, off in switches.items()})
    return ConsiStoryConfig(**values)


def _record(command: str, pipe: ConsiStoryPipeline, prompts, subjects, out, config, load_s) -> dict[str, Any]:
    return {
        "command": command,
        "model": pipe.model_id,
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "subjects": list(subjects),
        "prompts": list(prompts),
        "seeds": list(out.seeds),
        "config": config.to_dict(),
        "timings": {"load_model_s": load_s, **out.timings},
    }


def _finish(out_dir: Path, manifest_name: str, images, record: dict[str, Any], before_manifest=None) -> None:
    record["files"] = write_images(out_dir, images)
    record["grid"] = GRID_NAME
    if before_manifest is not None:
        before_manifest(record)
    write_json(record, out_dir / manifest_name)
    print(f"wrote {len(images)} images, {GRID_NAME} and {manifest_name} to {out_dir}/")


# --- subcommands ---
def check_paths(out: str, save: str | None = None) -> None:
    """Refuse unwritable destinations now rather than after minutes of denoising."""
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if save is not None and Path(save).is_dir():
        raise UsageError(f"--save {save} is a directory; give a file path such as {Path(save) / 'subject.cache'}")


def _prepare(args: argparse.Namespace) -> tuple[list[str], ConsiStoryConfig, str, torch.device]:
    """Everything `generate` and `anchors` can check before loading weights."""
    check_paths(args.out, getattr(args, "save", None))
    prompts = story_prompts(args, args.subject[0])
    config = build_config(args, args.model)
    model, device = resolve_model(args.model), resolve_device(args.device)
    check_prompts(model, prompts, args.subject)
    return prompts, config, model, device


def cmd_generate(args: argparse.Namespace) -> int:
    prompts, config, model, device = _prepare(args)
    pipe, load_s = open_pipeline(model, device, not args.no_progress)
    out = pipe.generate_story(prompts, args.subject, seed=args.seed, config=config)
    record = _record("generate", pipe, prompts, args.subject, out, config, load_s)
    record["n_anchors"] = min(config.n_anchors, len(prompts))
    _finish(begin_story_dir(args.out, "story.json"), "story.json", out.images, record)
    return 0


def cmd_anchors(args: argparse.Namespace) -> int:
    prompts, config, model, device = _prepare(args)
    pipe, load_s = open_pipeline(model, device, not args.no_progress)
    # The cache holds layer inputs for every step and layer: keep it in host memory, not on the GPU.
    out = pipe.create_anchors(prompts, args.subject, seed=args.seed, config=config, cache_device="cpu",
                              cache_codec=args.codec)
    record = _record("anchors", pipe, prompts, args.subject, out, out.cache.config, load_s)

    def save_cache(rec: dict[str, Any]) -> None:
        rec["cache"] = str(out.cache.save(args.save).resolve())
        rec["cache_bytes"] = out.cache.nbytes
        rec["cache_codec"] = out.cache.codec
        print(f"saved the anchor cache ({out.cache.nbytes / 2**20:.1f} MiB) to {args.save}")

    _finish(begin_story_dir(args.out, "anchors.json"), "anchors.json", out.images, record, save_cache)
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    check_paths(args.out)
    try:
        cache = AnchorCache.load(args.cache, device="cpu")
    except AnchorCacheError as error:
        raise AnchorCacheError(f"{args.cache}: {error}") from None
    prompts = story_prompts(args, cache.subjects[0])
    if args.seed and len(args.seed) != len(prompts):
        raise UsageError(f"got {len(args.seed)} --seed for {len(prompts)} prompts; give one per prompt, or none")
    model, device = resolve_model(args.model or cache.model_id), resolve_device(args.device)
    dtype = str(model_dtype(model, device)).removeprefix("torch.")
    if dtype != cache.dtype:
        raise UsageError(f"{args.cache} holds {cache.dtype} tensors but {model} runs in {dtype} on {device.type}; "
                         "extend on the kind of device the anchors were made on")
    check_prompts(model, prompts, cache.subjects)
    pipe, load_s = open_pipeline(model, device, not args.no_progress)
    out = pipe.generate_from_anchors(cache, prompts, seeds=args.seed or None)
    record = _record("extend", pipe, prompts, cache.subjects, out, cache.config, load_s)
    record.update(cache=str(Path(args.cache).resolve()), anchor_prompts=cache.anchor_prompts,
                  anchor_seeds=cache.seeds)
    _finish(begin_story_dir(args.out, "extend.json"), "extend.json", out.images, record)
    return 0


# --- parsing ---
def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seeds are integers in [0, 2**63 - 1] (got {text})")
    return value


def _prompt_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt naming the subject (repeatable)")
    group.add_argument("--settings", action="append", metavar="TEXT",
                       help='a setting; the prompt is STYLE + first subject + " " + setting (repeatable)')
    parser.add_argument("--style", default=DEFAULT_STYLE, help=f"prefix for --settings prompts (default {DEFAULT_STYLE!r})")


def _run_options(parser: argparse.ArgumentParser, out_default: str) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available (real weights then run in fp16)")
    parser.add_argument("--out", default=out_default, metavar="DIR", help=f"output directory (default {out_default})")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subject", action="append", required=True, help="the subject word or phrase (repeatable)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"an SDXL hub id or local directory (default {DEFAULT_MODEL}), "
                        f"or a random-weight preset: {', '.join(PRESETS)}")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the first image; image i gets seed + i")
    parser.add_argument("--steps", type=int, help="denoising steps (default 50; tiny 10, small 20)")
    parser.add_argument("--height", type=int, help="image height, a multiple of 8 (default 1024; tiny 128, small 256)")
    parser.add_argument("--width", type=int, help="image width, a multiple of 8 (default as --height)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 5.0)")
    for name, what in (("sdsa", "shared self-attention"), ("query-mixing", "vanilla query mixing"),
                       ("injection", "feature injection"), ("freeu", "FreeU")):
        parser.add_argument(f"--no-{name}", action="store_true", help=f"turn {what} off")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="consistory", description="Training-free consistent-subject image generation on SDXL.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate a story in one batch (the first images are the anchors)")
    _sampling_options(generate)
    generate.add_argument("--n-anchors", type=int, help="how many of the first images are anchors (default 2)")
    _prompt_options(generate)
    _run_options(generate, "story/")
    generate.set_defaults(run=cmd_generate)

    anchors = commands.add_parser("anchors", help="generate anchor images and save their anchor cache")
    _sampling_options(anchors)
    _prompt_options(anchors)
    anchors.add_argument("--save", required=True, metavar="PATH", help="where to write the anchor cache")
    anchors.add_argument("--codec", choices=("exact", "compact"), default="exact",
                         help="exact: every tensor as computed; compact: 8 bits or fewer per value, "
                              "about 1/6 of the bytes (default exact)")
    _run_options(anchors, "anchors/")
    anchors.set_defaults(run=cmd_anchors)

    extend = commands.add_parser("extend", help="new images of a cached subject (size and steps come from the cache)")
    extend.add_argument("cache", help="an anchor cache written by `consistory anchors`")
    extend.add_argument("--model", help="the model the cache was made with (default: the one it records)")
    extend.add_argument("--seed", type=_seed, action="append",
                        help="one per prompt (repeatable); default: continue the anchors' seeds")
    _prompt_options(extend)
    _run_options(extend, "extend/")
    extend.set_defaults(run=cmd_extend)
    return parser


# --- entry point ---
def _fail(error: BaseException | str, code: int) -> int:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    _say("error: " + (" ".join(lines) or type(error).__name__))
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed
        return done.code if isinstance(done.code, int) else 0
    try:
        return args.run(args)
    except (UsageError, ValueError, FileNotFoundError) as error:  # AnchorCacheError is a ValueError
        return _fail(error, 2)
    except torch.cuda.OutOfMemoryError as error:
        return _fail(f"out of GPU memory ({error}); try fewer prompts or a smaller size", 1)
    except OSError as error:
        return _fail(error, 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
