"""The anchor cache (ALGORITHM.md section 9): everything a new image needs from its anchors.

Tensors, by safetensors key:
  shared/p{pass}/s{step}/h{half}/{layer}/k|v  anchors' keys/values of the tokens in their dropout
                                              masks, per pass, `up` self-attention layer, step
                                              and CFG half (0 uncond, 1 cond); model dtype
  inject/s{step}/{layer}                      anchors' pre-injection attention outputs (cond half)
                                              of the tokens in their subject masks, pass 2
  anchor/dift                                 anchors' smoothed DIFT features (A, C, H, W)
  anchor/mask/{grid}                          anchors' final pass-1 subject masks (A, N)
Metadata (JSON in the safetensors header): subjects, anchor prompts, seeds, config, model id and
fingerprint, size, dtype and the format version. Serialization is safetensors only: loading a
file never executes code.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save

from .config import ConsiStoryConfig

FORMAT = "consistory.anchor_cache"
FORMAT_VERSION = 2


class AnchorCacheError(ValueError):
    """The bytes are not a usable anchor cache (wrong format, version, model or size)."""


@dataclass
class AnchorCache:
    subjects: list[str]
    anchor_prompts: list[str]
    seeds: list[int]
    config: ConsiStoryConfig
    model_id: str
    model_fingerprint: str
    dtype: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    storage_device: str | None = None  # where recorded tensors are put (None: where computed)

    # --- recording (used while the anchors are generated) ---
    def _store(self, key: str, tensor: torch.Tensor) -> None:
        t = tensor.detach()
        if self.storage_device is not None and torch.device(self.storage_device) != t.device:
            if t.device.type == "cuda" and torch.device(self.storage_device).type == "cpu":
                # Pinned target + non_blocking: the copy overlaps the denoising loop instead of
                # stalling the GPU at every layer; `_settle` waits once before the data is read.
                pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                pinned.copy_(t, non_blocking=True)
                self._copies_pending = True
                t = pinned
            else:
                t = t.to(self.storage_device)
        self.tensors[key] = t.contiguous()

    def _settle(self) -> None:
        if getattr(self, "_copies_pending", False):
            torch.cuda.synchronize()
            self._copies_pending = False

    def put_shared(self, pass_index: int, layer: str, step: int, half: int, inputs: torch.Tensor) -> None:
        self._store(f"shared/p{pass_index}/s{step}/h{half}/{layer}", inputs)

    def put_injection(self, layer: str, step: int, bank: torch.Tensor) -> None:
        self._store(f"inject/s{step}/{layer}", bank)

    def put_anchor_features(self, dift: torch.Tensor | None, masks: dict[str, torch.Tensor]) -> None:
        if dift is not None:
            self._store("anchor/dift", dift)
        for grid, mask in masks.items():
            self._store(f"anchor/mask/{grid}", mask)

    # --- replay (used while new images are generated) ---
    def _fetch(self, key: str, device) -> torch.Tensor:
        self._settle()
        try:
            tensor = self.tensors[key]
        except KeyError:
            raise AnchorCacheError(
                f"the anchor cache has no tensor {key!r}: it was made with a different config or model"
            ) from None
        if device is None:
            return tensor
        # Asynchronous only host -> GPU (from pinned memory it overlaps compute); a copy towards
        # the host must complete before the host reads it.
        return tensor.to(device, non_blocking=torch.device(device).type == "cuda")

    def shared_inputs(self, pass_index: int, layer: str, step: int, half: int, device=None, dtype=None):
        return self._fetch(f"shared/p{pass_index}/s{step}/h{half}/{layer}", device)

    def injection(self, layer: str, step: int, device=None, dtype=None) -> torch.Tensor:
        return self._fetch(f"inject/s{step}/{layer}", device)

    @property
    def dift(self) -> torch.Tensor:
        return self._fetch("anchor/dift", None)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return {k.rsplit("/", 1)[1]: v for k, v in self.tensors.items() if k.startswith("anchor/mask/")}

    @property
    def n_anchors(self) -> int:
        return len(self.anchor_prompts)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device) -> "AnchorCache":
        """A copy with every tensor on `device` (e.g. "cpu" to keep the cache off the GPU)."""
        self._settle()
        moved = {k: v.to(device) for k, v in self.tensors.items()}
        return AnchorCache(**{**self._fields(), "tensors": moved})

    def pin_memory(self) -> "AnchorCache":
        """A copy in page-locked host memory: replay on a GPU then copies each layer's tensors
        asynchronously, overlapping the denoising work, instead of stalling at every layer."""
        self._settle()
        pinned = {k: v.cpu().pin_memory() for k, v in self.tensors.items()}
        return AnchorCache(**{**self._fields(), "tensors": pinned})

    def _fields(self) -> dict[str, Any]:
        return {
            "subjects": list(self.subjects),
            "anchor_prompts": list(self.anchor_prompts),
            "seeds": list(self.seeds),
            "config": self.config,
            "model_id": self.model_id,
            "model_fingerprint": self.model_fingerprint,
            "dtype": self.dtype,
        }

    # --- serialization (safetensors) ---
    def metadata(self) -> dict[str, str]:
        values = {**self._fields(), "config": self.config.to_dict()}
        return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "consistory": json.dumps(values)}

    def to_bytes(self) -> bytes:
        self._settle()
        return st_save({k: v.cpu() for k, v in self.tensors.items()}, metadata=self.metadata())

    @classmethod
    def from_bytes(cls, data: bytes, device="cpu") -> "AnchorCache":
        metadata = _read_metadata(data)
        try:
            tensors = st_load(data)
        except Exception as error:  # a damaged body after a readable header
            raise AnchorCacheError(f"not a readable anchor cache: {error}") from None
        return cls._from_parts(metadata, tensors, device)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename), so a crash never leaves half a cache."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.to_bytes())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> "AnchorCache":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no anchor cache at {path}")
        with open(path, "rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            head += f.read(min(length, path.stat().st_size))
        metadata = _read_metadata(head)
        try:  # straight from the file: no second copy of a multi-GB cache in memory
            tensors = st_load_file(str(path), device=str(device))
        except Exception as error:
            raise AnchorCacheError(f"not a readable anchor cache: {error}") from None
        return cls._from_parts(metadata, tensors, device)

    @classmethod
    def _from_parts(cls, metadata: dict[str, str], tensors: dict[str, torch.Tensor], device) -> "AnchorCache":
        values = json.loads(metadata["consistory"])
        values["config"] = ConsiStoryConfig.from_dict(values["config"])
        return cls(**values, tensors={k: v.to(device) for k, v in tensors.items()})

    def check_compatible(self, model_fingerprint: str, config: ConsiStoryConfig) -> None:
        """Refuse a cache made by another model or with other settings, saying which."""
        if model_fingerprint != self.model_fingerprint:
            raise AnchorCacheError(
                f"this anchor cache was made with model {self.model_id!r} "
                f"(fingerprint {self.model_fingerprint}); the pipeline's model has fingerprint "
                f"{model_fingerprint}. Load the same model or create the anchors again."
            )
        if config != self.config:
            diff = {k: (v, getattr(config, k)) for k, v in self.config.to_dict().items() if getattr(config, k) != v}
            raise AnchorCacheError(
                "the config differs from the one the anchors were made with "
                f"(field: (cache, given) = {diff}); pass config=None to use the cache's"
            )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's metadata, checked to be a ConsiStory anchor cache of our version."""
    if len(data) < 8:
        raise AnchorCacheError("not an anchor cache: the data is too short to be a safetensors file")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise AnchorCacheError("not an anchor cache: the safetensors header is truncated")
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError:
        raise AnchorCacheError("not an anchor cache: the safetensors header is not JSON") from None
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT or "consistory" not in metadata:
        raise AnchorCacheError("not an anchor cache: the safetensors file has no ConsiStory metadata")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise AnchorCacheError(
            f"anchor cache format version {metadata.get('format_version')} is not supported "
            f"(this version reads {FORMAT_VERSION}); create the anchors again"
        )
    return metadata
