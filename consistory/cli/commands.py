"""The `generate`, `anchors` and `extend` commands: torch, diffusers and the model load here,
imported only once one of them runs (so `consistory --help` answers at once)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..cache.anchor_cache import AnchorCache, AnchorCacheError
from .images import anchor_photos, control_images, image_record
from ..loading import load_controlnet, locate_model, resolve_device, resolve_dtype, resolve_model
from .models import check_prompts, open_pipeline
from .options import build_config, story_anchors, story_prompts
from ..config import ConsiStoryConfig
from ..errors import UsageError
from ..pipeline import ConsiStoryPipeline
from .story_files import GRID_NAME, begin_story_dir, write_images, write_json


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
    print(f"wrote {len(images)} image{'s' if len(images) != 1 else ''}, {GRID_NAME} and {manifest_name} to {out_dir}/")


def check_paths(out: str, save: str | None = None) -> None:
    """Refuse unwritable destinations now rather than after minutes of denoising."""
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if save is not None and Path(save).is_dir():
        raise UsageError(f"--save {save} is a directory; give a file path such as {Path(save) / 'subject.cache'}")


def _prepare(args: argparse.Namespace) -> tuple[list[str], ConsiStoryConfig, str, torch.device, bool, dict]:
    """Everything `generate` and `anchors` can check before loading weights; the last item
    holds the images given with the prompts, as the library's keyword arguments."""
    check_paths(args.out, getattr(args, "save", None))
    prompts = story_prompts(args, args.subject[0])
    config = build_config(args, args.model)
    n_anchors = len(prompts)
    if args.command == "generate":
        config = story_anchors(config, len(prompts), args.n_anchors)
        n_anchors = min(config.n_anchors, len(prompts))
    images = dict(images=anchor_photos(args, n_anchors), control_images=control_images(args, len(prompts)),
                  controlnet_conditioning_scale=args.control_scale)
    model, device = resolve_model(args.model), resolve_device(args.device)
    cache_only = locate_model(model)
    check_prompts(model, prompts, args.subject, cache_only)
    return prompts, config, model, device, cache_only, images


def _open(args: argparse.Namespace, model: str, device: torch.device, cache_only: bool):
    """The pipeline, with the --controlnet when one is named."""
    pipe, load_s = open_pipeline(model, device, not args.no_progress, cache_only, args.compile)
    if args.controlnet:
        pipe.controlnet = load_controlnet(args.controlnet, pipe.sdxl.unet, locate_model(args.controlnet))
    return pipe, load_s


def cmd_generate(args: argparse.Namespace) -> int:
    prompts, config, model, device, cache_only, images = _prepare(args)
    pipe, load_s = _open(args, model, device, cache_only)
    out = pipe.generate_story(prompts, args.subject, seed=args.seed, config=config, **images)
    record = _record("generate", pipe, prompts, args.subject, out, config, load_s)
    record.update(image_record(args))
    record["n_anchors"] = min(config.n_anchors, len(prompts))
    _finish(begin_story_dir(args.out, "story.json"), "story.json", out.images, record)
    return 0


def cmd_anchors(args: argparse.Namespace) -> int:
    prompts, config, model, device, cache_only, images = _prepare(args)
    pipe, load_s = _open(args, model, device, cache_only)
    # The cache holds layer inputs for every step and layer: keep it in host memory, not on the GPU.
    out = pipe.create_anchors(prompts, args.subject, seed=args.seed, config=config, cache_device="cpu",
                              cache_codec=args.codec, **images)
    record = _record("anchors", pipe, prompts, args.subject, out, out.cache.config, load_s)
    record.update(image_record(args))

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
        raise UsageError(f"{args.cache}: {error}") from None
    prompts = story_prompts(args, cache.subjects[0])
    if args.seed and len(args.seed) != len(prompts):
        raise UsageError(f"got {len(args.seed)} --seed for {len(prompts)} prompts; give one per prompt, or none")
    controls = control_images(args, len(prompts))
    model, device = resolve_model(args.model or cache.model_id), resolve_device(args.device)
    dtype = str(resolve_dtype("auto", device)).removeprefix("torch.")
    if dtype != cache.dtype:
        raise UsageError(f"{args.cache} holds {cache.dtype} tensors but {model} runs in {dtype} on {device.type}; "
                         "extend on the kind of device the anchors were made on")
    cache_only = locate_model(model)
    check_prompts(model, prompts, cache.subjects, cache_only)
    pipe, load_s = _open(args, model, device, cache_only)
    try:
        out = pipe.generate_from_anchors(cache, prompts, seeds=args.seed or None, control_images=controls,
                                         controlnet_conditioning_scale=args.control_scale)
    except AnchorCacheError as error:
        raise UsageError(f"{args.cache}: {error}") from None
    record = _record("extend", pipe, prompts, cache.subjects, out, cache.config, load_s)
    record.update(image_record(args))
    record.update(cache=str(Path(args.cache).resolve()), anchor_prompts=cache.anchor_prompts,
                  anchor_seeds=cache.seeds)
    _finish(begin_story_dir(args.out, "extend.json"), "extend.json", out.images, record)
    return 0
