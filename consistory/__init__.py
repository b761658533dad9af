"""ConsiStory: training-free consistent-subject text-to-image generation on diffusers SDXL."""

from .anchor_cache import AnchorCache, AnchorCacheError
from .config import ConsiStoryConfig, vanilla_config
from .outputs import AnchorsOutput, StoryOutput
from .pipeline import ConsiStoryPipeline

__all__ = [
    "AnchorCache",
    "AnchorCacheError",
    "AnchorsOutput",
    "ConsiStoryConfig",
    "ConsiStoryPipeline",
    "StoryOutput",
    "vanilla_config",
]
__version__ = "0.1.0"
