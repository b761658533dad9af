"""The model names the command line accepts, checked without importing torch or diffusers.

A model is a random-weight preset ("tiny", or "preset:tiny:3" as caches record it), a local
directory holding SDXL weights, or a Hugging Face hub id ("org/name").
"""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError

PRESETS: tuple[str, ...] = ("tiny", "small", "full")
DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"  # the published method's base model
# Sampling defaults per preset, so a random-weight smoke run is quick on CPU; real weights and
# "full" keep the published defaults of ConsiStoryConfig (1024 px, 50 steps).
PRESET_SAMPLING: dict[str, dict[str, int]] = {
    "tiny": dict(height=128, width=128, num_inference_steps=10),
    "small": dict(height=256, width=256, num_inference_steps=20),
}


def preset_of(model: str) -> tuple[str, int] | None:
    """("tiny", 0) for "tiny"; ("tiny", 3) for a cache's model id "preset:tiny:3"; None for weights."""
    if model in PRESETS:
        return model, 0
    if model.startswith("preset:"):
        parts = model.split(":")
        if len(parts) != 3 or parts[1] not in PRESETS or not parts[2].isdigit():
            raise UsageError(f"bad preset model id {model!r}; expected preset:<{'|'.join(PRESETS)}>:<seed>")
        return parts[1], int(parts[2])
    return None


def is_local_model(model: str) -> bool:
    return preset_of(model) is None and Path(model).expanduser().exists()


def resolve_model(model: str) -> str:
    """Check a model argument before anything heavy runs; local directories become absolute."""
    if preset_of(model) is not None:
        return model
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UsageError(f"{model!r} holds no diffusers SDXL pipeline (no model_index.json); give the directory "
                             "that save_pretrained wrote, a hub id like org/name, or a preset such as tiny")
        return str(path.resolve())  # recorded in caches: absolute, so `extend` finds it from anywhere
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"no model directory at {model!r} (and it is not a hub id like org/name)")
    return model


def sampling_defaults(model: str) -> dict[str, int]:
    """The sampling values a model gets where the user sets none (empty: the config's own)."""
    preset = preset_of(model)
    return dict(PRESET_SAMPLING.get(preset[0], {})) if preset else {}
