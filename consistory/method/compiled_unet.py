"""The UNet under `torch.compile`, with the method's attention processors left out of it.

The processors read per-step Python state (step, pass, flags, mix strength, masks, the anchors'
source) and record into Python objects; traced, every step would guard on new values and
compile again. They are marked `torch.compiler.disable` (see `processors`), so the compiled
graphs hold everything else (convolutions, norms, feed-forwards, the projections of layers the
method leaves alone) and break at the method's layers, where the processors run eagerly. The
graphs then depend only on shapes: one set per image size and batch, reused by every later
generation whatever its prompts, seeds or anchors.

On CUDA the mode is "reduce-overhead" (CUDA graphs: the shapes are static); elsewhere plain
inductor, which does not pay on a CPU and is there so the path runs everywhere.
"""

from __future__ import annotations

import torch

# Each image size and batch size is a separate set of graphs, and some diffusers functions are
# entered with many shapes (a resnet per channel count and resolution). dynamo's default of 8
# graphs per function would silently fall back to eager once a service has seen a few sizes.
RECOMPILE_LIMIT = 256
_COMPILED_FOR = "_consistory_compiled_for"


def compile_options(device: torch.device) -> dict:
    """torch.compile's arguments for a UNet on `device`: static shapes, CUDA graphs on CUDA."""
    return {"mode": "reduce-overhead" if device.type == "cuda" else None, "dynamic": False}


def set_compiled(unet, on: bool) -> None:
    """Compile `unet` for the device it is on now (again if it moved), or undo it. Nothing is
    compiled here: torch.compile works on the first call of each shape."""
    compiled_for = getattr(unet, _COMPILED_FOR, None)
    if not on:
        if compiled_for is not None:
            unet._compiled_call_impl = None
            setattr(unet, _COMPILED_FOR, None)
        return
    if compiled_for == unet.device.type:
        return
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 8 * RECOMPILE_LIMIT)
    unet.compile(**compile_options(unet.device))
    setattr(unet, _COMPILED_FOR, unet.device.type)


def is_compiled(unet) -> bool:
    return getattr(unet, _COMPILED_FOR, None) is not None


def begin_forward(unet) -> None:
    """Before each UNet call: with CUDA graphs, tells them a new iteration starts, so the
    buffers of the previous step's graphs may be reused (nothing of them is kept: every tensor
    the method keeps across steps is a fresh result of its own eager ops)."""
    if getattr(unet, _COMPILED_FOR, None) == "cuda":
        torch.compiler.cudagraph_mark_step_begin()
