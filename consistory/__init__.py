"""ConsiStory: training-free consistent-subject text-to-image generation on diffusers SDXL.

The public names are imported on first use, so `import consistory` (and `consistory --help`)
does not pay for torch and diffusers until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AnchorCache": ".cache.anchor_cache",
    "AnchorCacheError": ".cache.anchor_cache",
    "AnchorsOutput": ".outputs",
    "ConsiStoryConfig": ".config",
    "ConsiStoryPipeline": ".pipeline",
    "InputError": ".errors",
    "StepProgress": ".progress",
    "StoryOutput": ".outputs",
    "vanilla_config": ".config",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .cache.anchor_cache import AnchorCache, AnchorCacheError
    from .config import ConsiStoryConfig, vanilla_config
    from .errors import InputError
    from .outputs import AnchorsOutput, StoryOutput
    from .pipeline import ConsiStoryPipeline
    from .progress import StepProgress


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'consistory' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
