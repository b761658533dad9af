"""Moving small tensors between the host and the device without stalling the device."""

from __future__ import annotations

import torch


class HostCount:
    """A device integer, copied towards the host as soon as it is computed and read later.

    A plain `.item()` waits for everything queued on the device so far; this waits only for the
    work queued before the value, so reading it a step later costs the device nothing.
    """

    def __init__(self, value: torch.Tensor) -> None:
        self._event = None
        if value.device.type == "cuda":
            self._host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self._host.copy_(value, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = value

    def get(self) -> int:
        if self._event is not None:
            self._event.synchronize()
        return int(self._host)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`; towards a GPU through pinned memory, so the host does not wait."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
