"""The tensors of one anchor cache by name: where a codec puts what it records and gets what it
replays, without knowing where the bytes lie (GPU, pinned host memory, a mapped file, shared
memory)."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Iterator

import torch

from .layout import LayoutError, LazyTensors, entry


class AnchorCacheError(ValueError):
    """The bytes are not a usable anchor cache (wrong format, version, model or size)."""


class TensorStore:
    """Named tensors, put on `device` while recording (None: where they were computed) and
    fetched to wherever replay needs them."""

    def __init__(self, tensors: MutableMapping[str, torch.Tensor] | Mapping[str, torch.Tensor],
                 device: str | None = None) -> None:
        self.tensors = tensors
        self.device = device
        self._copies_pending = False

    def put(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach()
        if self.device is not None and torch.device(self.device) != t.device:
            if t.device.type == "cuda" and torch.device(self.device).type == "cpu":
                # Pinned target + non_blocking: the copy overlaps the denoising loop instead of
                # stalling the GPU at every layer; `settle` waits once before the data is read.
                pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                pinned.copy_(t, non_blocking=True)
                self._copies_pending = True
                t = pinned
            else:
                t = t.to(self.device)
        self.tensors[name] = t.contiguous()

    def settle(self) -> None:
        """Wait for the copies `put` left in flight."""
        if self._copies_pending:
            torch.cuda.synchronize()
            self._copies_pending = False

    def get(self, name: str, device=None) -> torch.Tensor:
        """The tensor `name`, on `device` (None: where it is kept)."""
        self.settle()
        try:
            tensor = self.tensors[name]
        except KeyError:
            raise AnchorCacheError(
                f"the anchor cache has no tensor {name!r}: it was made with a different config or model"
            ) from None
        except LayoutError as error:
            raise AnchorCacheError(f"the anchor cache is damaged: {error}") from None
        if device is None:
            return tensor
        # Asynchronous only host -> GPU (from pinned memory it overlaps compute); a copy towards
        # the host must complete before the host reads it.
        return tensor.to(device, non_blocking=torch.device(device).type == "cuda")

    def drop(self, name: str) -> None:
        del self.tensors[name]

    def dtype_and_shape(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """What `name` holds, from the header alone where the cache is read in place."""
        if isinstance(self.tensors, LazyTensors):
            e = entry(name, self.tensors.entries[name])
            return e.dtype, e.shape
        t = self.tensors[name]
        return t.dtype, tuple(t.shape)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)
