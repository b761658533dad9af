"""Which ControlNet a pipeline gets: a random one built from a preset's UNet ("tiny", or
"preset:tiny:3"), a local directory, or a hub id of an SDXL ControlNet."""

from __future__ import annotations

from .errors import InputError
from .model_ids import preset_of


def load_controlnet(name: str, unet, cache_only: bool = False):
    """The ControlNet `name` on the UNet's device and in its dtype."""
    preset = preset_of(name)
    if preset is not None:
        from .presets import build_preset_controlnet

        return build_preset_controlnet(unet, seed=preset[1])
    from diffusers import ControlNetModel

    try:
        controlnet = ControlNetModel.from_pretrained(name, torch_dtype=unet.dtype, local_files_only=cache_only)
    except (OSError, ValueError) as error:
        raise InputError(f"could not load the ControlNet {name!r}: {str(error).splitlines()[0]}") from None
    return controlnet.to(unet.device).eval()
