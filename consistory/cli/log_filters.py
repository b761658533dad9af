"""Silence library log lines that a user of the command line can do nothing about.

transformers warns, while diffusers imports its pipelines, that CLIP's and SigLIP's image
processors fall back to PIL without torchvision. SDXL never runs those processors, and the eval
command builds its own PIL processor, so the advice to install torchvision changes nothing.
"""

from __future__ import annotations

import logging

_TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"


class _DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _TORCHVISION_FALLBACK not in record.getMessage()


_FILTER = _DropTorchvisionFallback()


def quiet_library_warnings() -> None:
    """Idempotent; call before diffusers or transformers are imported (or at any time after)."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
