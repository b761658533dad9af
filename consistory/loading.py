"""How a model is named, placed and loaded: one policy for the CLI, the batch actors and the
service's replicas.

Model ids (one grammar everywhere):
- a random-weight preset: `preset:NAME` or `preset:NAME:SEED` (NAME one of `PRESETS`; SEED 0 when
  left out), and on the command line the bare NAME (`tiny`). Caches and subject records hold the
  full form, `preset:tiny:0`, which `model_id` gives;
- a local directory that `save_pretrained` wrote;
- a Hugging Face hub id, `org/name`.

Device "auto" is CUDA where torch sees it, else the CPU. Dtype "auto" is float16 on CUDA (the
published method runs SDXL in fp16) and float32 elsewhere (CPUs lack fast fp16 kernels). Real
weights in fp16 load a checkpoint's fp16 files, and where it has none, its full files cast.

The names here import torch, diffusers and transformers only inside the functions that need
them, so the command line's `--help` stays instant.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError, UsageError
from .presets import PRESETS
from .seeds import MAX_SEED

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizer

    from .pipeline import ConsiStoryPipeline

logger = logging.getLogger(__name__)

PRESET_PREFIX = "preset:"
DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"  # the published method's base model
# Sampling defaults per preset, so a random-weight smoke run is quick on CPU; real weights and
# "full" keep the published defaults of ConsiStoryConfig (1024 px, 50 steps).
PRESET_SAMPLING: dict[str, dict[str, int]] = {
    "tiny": dict(height=128, width=128, num_inference_steps=10),
    "small": dict(height=256, width=256, num_inference_steps=20),
}


# --- model ids ---
def parse_preset(model: str) -> tuple[str, int] | None:
    """("tiny", 0) for "tiny" and "preset:tiny"; ("tiny", 3) for "preset:tiny:3"; None for a
    directory or hub id. A malformed "preset:..." is an InputError saying how to write one."""
    if model in PRESETS:
        return model, 0
    if not model.startswith(PRESET_PREFIX):
        return None
    parts = model[len(PRESET_PREFIX):].split(":")
    seed_text = parts[1] if len(parts) == 2 else "0"
    if (len(parts) > 2 or parts[0] not in PRESETS or not (seed_text.isascii() and seed_text.isdigit())
            or len(seed_text) > 19 or int(seed_text) > MAX_SEED):
        raise InputError(f"bad preset model id {model!r}; write {PRESET_PREFIX}NAME or {PRESET_PREFIX}NAME:SEED "
                         f"with NAME one of {', '.join(PRESETS)} and SEED an integer in [0, 2**63 - 1]")
    return parts[0], int(seed_text)


def preset_id(name: str, seed: int = 0) -> str:
    return f"{PRESET_PREFIX}{name}:{seed}"


def model_id(model: str) -> str:
    """The id a pipeline loaded from `model` records: presets in full (`preset:tiny:0`), anything
    else as given."""
    preset = parse_preset(model)
    return preset_id(*preset) if preset is not None else model


def is_local_model(model: str) -> bool:
    return parse_preset(model) is None and Path(model).expanduser().exists()


def resolve_model(model: str) -> str:
    """Check a model argument before anything heavy runs; local directories become absolute
    (recorded in caches, so `extend` finds them from anywhere). Raises UsageError."""
    try:
        if parse_preset(model) is not None:
            return model
    except InputError as error:
        raise UsageError(str(error)) from None
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UsageError(f"{model!r} holds no diffusers SDXL pipeline (no model_index.json); give the directory "
                             "that save_pretrained wrote, a hub id like org/name, or a preset such as tiny")
        return str(path.resolve())
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"no model directory at {model!r} (and it is not a hub id like org/name)")
    return model


def sampling_defaults(model: str) -> dict[str, int]:
    """The sampling values a model gets where the user sets none (empty: the config's own)."""
    preset = parse_preset(model)
    return dict(PRESET_SAMPLING.get(preset[0], {})) if preset else {}


# --- device and dtype ---
def resolve_device(name: Any = "auto") -> "torch.device":
    """"auto": CUDA where torch sees a device, else the CPU; "cpu", "cuda", "cuda:1", or a
    torch.device as given. Asking for CUDA where there is none is an InputError."""
    import torch

    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} was asked for but CUDA is not available; use auto or cpu")
    return device


def resolve_dtype(dtype: Any = "auto", device: Any = "cpu") -> "torch.dtype":
    """"auto": float16 on CUDA, float32 elsewhere; a name ("bfloat16") or a torch.dtype as given."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise InputError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return value


# --- loading ---
def load_pipeline(model: str, device: Any = "auto", dtype: Any = "auto", variant: str | None = None,
                  cache_only: bool = False, controlnet: str | None = None,
                  compile: bool = False) -> "ConsiStoryPipeline":
    """The ConsiStory pipeline of `model` on its device, with the ControlNet `controlnet` (a
    preset id, a directory or a hub id) when one is named. `cache_only`: load a hub id from the
    local Hugging Face cache only. `compile`: run the UNet under torch.compile
    (`ConsiStoryPipeline.compile`; `warm_up` makes the graphs before the first request)."""
    import torch

    from .pipeline import ConsiStoryPipeline

    place = resolve_device(device)
    dtype = resolve_dtype(dtype, place)
    preset = parse_preset(model)
    if preset is not None:
        pipe = ConsiStoryPipeline.from_preset(preset[0], seed=preset[1], torch_dtype=dtype, device=place)
    else:
        kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": cache_only}
        if variant is None and dtype == torch.float16:
            variant = "fp16"  # SDXL checkpoints ship fp16 files: half the download
            try:
                pipe = ConsiStoryPipeline.from_pretrained(model, variant=variant, **kwargs)
            except (OSError, ValueError) as error:
                if "variant" not in str(error):
                    raise
                # A checkpoint without fp16 files: load the full-precision files and cast them.
                pipe = ConsiStoryPipeline.from_pretrained(model, **kwargs)
        else:
            pipe = ConsiStoryPipeline.from_pretrained(model, **({"variant": variant} if variant else {}), **kwargs)
        pipe = pipe.to(place)
    if controlnet:
        pipe.controlnet = load_controlnet(controlnet, pipe.sdxl.unet, cache_only)
    pipe.compile = compile
    return pipe


def load_controlnet(name: str, unet, cache_only: bool = False):
    """The ControlNet `name` on the UNet's device and in its dtype: a preset id builds a random
    one from the preset's UNet (seeded, so every replica gets the same), anything else loads an
    SDXL ControlNet from a directory or the hub."""
    preset = parse_preset(name)
    if preset is not None:
        from .presets.sdxl import build_preset_controlnet

        return build_preset_controlnet(unet, seed=preset[1])
    from diffusers import ControlNetModel

    try:
        controlnet = ControlNetModel.from_pretrained(name, torch_dtype=unet.dtype, local_files_only=cache_only)
    except (OSError, ValueError) as error:
        raise InputError(f"could not load the ControlNet {name!r}: {str(error).splitlines()[0]}") from None
    return controlnet.to(unet.device).eval()


def load_tokenizer(model: str, cache_only: bool = False) -> "CLIPTokenizer | None":
    """The model's first tokenizer (the one subjects are found with), or None where it cannot be
    read without loading the model (loading the model then reports what is wrong with it)."""
    try:
        if parse_preset(model) is not None:
            from .presets.tokenizer import build_local_clip_tokenizer

            return build_local_clip_tokenizer()
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=cache_only)
    except (OSError, ValueError) as error:
        logger.info("no tokenizer for %s (%s)", model, error)
        return None
    # transformers can hand back an empty tokenizer (no vocabulary, no length limit) for files it
    # could not read; finding subjects with it would fail in confusing ways.
    if len(tokenizer) <= len(tokenizer.all_special_tokens) or tokenizer.model_max_length > 100_000:
        return None
    return tokenizer


def locate_model(model: str) -> bool:
    """For a resolved model: True when it must load from the local Hugging Face cache only (a
    hub id while the hub is unreachable or HF_HUB_OFFLINE is set). Raises ModelUnavailable."""
    if parse_preset(model) is not None or is_local_model(model):
        return False
    from .hub_access import cache_only

    return cache_only(model)
