"""The anchor cache (ALGORITHM.md section 9): everything a new image needs from its anchors.

What is stored, and how, is the codec's (`cache_codecs`: "exact" or "compact"); where the
bytes lie is the layout's (`cache_layout`: one safetensors file that splits into chunks and is
read in place). Metadata (JSON in the safetensors header): subjects, anchor prompts, seeds,
config, model id and fingerprint, dtype, codec and the format version. Loading a file never
executes code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .cache_codecs import CODECS, codec_for
from .cache_layout import (
    CHUNK_BYTES,
    CacheBuffers,
    LayoutError,
    LazyTensors,
    map_file,
    read_buffer,
    read_buffers,
    serialize,
    write_file,
)
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
    codec: str = "exact"
    tensors: MutableMapping[str, torch.Tensor] | Mapping[str, torch.Tensor] = field(default_factory=dict)
    storage_device: str | None = None  # where recorded tensors are put (None: where computed)

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"cache_codec must be one of {', '.join(CODECS)} (got {self.codec!r})")
        self._codec = codec_for(self)
        self._copies_pending = False

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
        if self._copies_pending:
            torch.cuda.synchronize()
            self._copies_pending = False

    def put_shared(self, pass_index: int, layer: str, step: int, half: int, inputs: torch.Tensor, attn, grid: str) -> None:
        """The inputs of an `up` self-attention layer at the anchors' shared tokens (M, C)."""
        self._codec.put_shared(pass_index, layer, step, half, inputs, attn, grid)

    def put_tokens(self, pass_index: int, step: int, grid: str, mask: torch.Tensor) -> None:
        """The anchors' dropout masks (A, N) of a pass, step and grid."""
        self._codec.put_tokens(pass_index, step, grid, mask)

    def put_injection(self, layer: str, step: int, bank: torch.Tensor) -> None:
        self._codec.put_injection(layer, step, bank)

    def put_anchor_features(self, dift: torch.Tensor | None, masks: dict[str, torch.Tensor]) -> None:
        if dift is not None:
            self._codec.put_dift(dift)
        for grid, mask in masks.items():
            self._store(f"anchor/mask/{grid}", mask)

    def finish_recording(self) -> None:
        self._codec.finish()
        self._settle()

    # --- replay (used while new images are generated) ---
    def _fetch(self, key: str, device) -> torch.Tensor:
        self._settle()
        try:
            tensor = self.tensors[key]
        except KeyError:
            raise AnchorCacheError(
                f"the anchor cache has no tensor {key!r}: it was made with a different config or model"
            ) from None
        except LayoutError as error:
            raise AnchorCacheError(f"the anchor cache is damaged: {error}") from None
        if device is None:
            return tensor
        # Asynchronous only host -> GPU (from pinned memory it overlaps compute); a copy towards
        # the host must complete before the host reads it.
        return tensor.to(device, non_blocking=torch.device(device).type == "cuda")

    def shared_inputs(self, pass_index: int, layer: str, step: int, half: int, grid: str, device=None, dtype=None):
        """(M, C) inputs of `layer` at the anchors' shared tokens, decoded on `device`."""
        return self._codec.shared_inputs(pass_index, layer, step, half, grid, device, dtype or torch.float32)

    def injection(self, layer: str, step: int, device=None, dtype=None) -> torch.Tensor:
        return self._codec.injection(layer, step, device, dtype or torch.float32)

    @property
    def dift(self) -> torch.Tensor:
        return self._fetch("anchor/dift", None).float()

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return {k.rsplit("/", 1)[1]: self.tensors[k] for k in self.tensors if k.startswith("anchor/mask/")}

    @property
    def n_anchors(self) -> int:
        return len(self.anchor_prompts)

    @property
    def nbytes(self) -> int:
        if hasattr(self.tensors, "nbytes"):
            return self.tensors.nbytes
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device) -> "AnchorCache":
        """A copy with every tensor on `device` (e.g. "cpu" to keep the cache off the GPU); a
        cache read in place stays in place when asked for the CPU."""
        if isinstance(self.tensors, LazyTensors) and torch.device(device).type == "cpu":
            return self
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
            "codec": self.codec,
        }

    # --- serialization: safetensors, in chunks, read in place ---
    def metadata(self) -> dict[str, str]:
        values = {**self._fields(), "config": self.config.to_dict()}
        return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "consistory": json.dumps(values)}

    def to_buffers(self, chunk_bytes: int = CHUNK_BYTES) -> CacheBuffers:
        """The safetensors header and the data section in chunks of at most `chunk_bytes`."""
        self._settle()
        return serialize(self.tensors, self.metadata(), chunk_bytes)

    @classmethod
    def from_buffers(cls, header: Any, chunks: Sequence[Any]) -> "AnchorCache":
        """A cache whose tensors are views into `chunks` (shared memory, a mapped file): no copy."""
        try:
            metadata, tensors = read_buffers(header, chunks)
        except LayoutError as error:
            raise AnchorCacheError(f"not an anchor cache: {error}") from None
        return cls._from_parts(metadata, tensors)

    def to_bytes(self) -> bytes:
        return b"".join(self.to_buffers())

    @classmethod
    def from_bytes(cls, data: Any, device="cpu") -> "AnchorCache":
        """From a buffer holding a whole file; on the CPU its tensors are views into `data`."""
        try:
            metadata, tensors, _ = read_buffer(data)
        except LayoutError as error:
            raise AnchorCacheError(f"not an anchor cache: {error}") from None
        cache = cls._from_parts(metadata, tensors)
        return cache if torch.device(device).type == "cpu" else cache.to(device)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename), so a crash never leaves half a cache."""
        return write_file(path, self.to_buffers())

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> "AnchorCache":
        """Map the file and read it in place (pages load as they are used); `device` other than
        the CPU copies it there."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no anchor cache at {path}")
        try:
            mapped = map_file(path)
        except LayoutError as error:
            raise AnchorCacheError(f"not an anchor cache: {error}") from None
        return cls.from_bytes(mapped, device)

    @classmethod
    def _from_parts(cls, metadata: dict[str, str], tensors: Mapping[str, torch.Tensor]) -> "AnchorCache":
        _check_format(metadata)
        try:
            values = json.loads(metadata["consistory"])
            values["config"] = ConsiStoryConfig.from_dict(values["config"])
            return cls(**values, tensors=tensors)
        except (ValueError, TypeError, KeyError) as error:
            raise AnchorCacheError(f"not an anchor cache: its metadata is malformed ({error})") from None

    def check_structure(self, unet, vae_scale_factor: int = 8) -> None:
        """Refuse a damaged or incomplete cache (a missing, extra or misshapen tensor for this
        UNet's layers), reading only the header; checked once per cache object."""
        from .cache_check import structure_problem

        if getattr(self, "_structure_ok", None) is unet:
            return
        problem = structure_problem(self, unet, vae_scale_factor)
        if problem:
            raise AnchorCacheError(f"the anchor cache is damaged or incomplete: {problem}; create the anchors again")
        self._structure_ok = unet

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


def _check_format(metadata: dict[str, str]) -> None:
    """Refuse anything but a ConsiStory anchor cache of this format version, saying why."""
    if metadata.get("format") != FORMAT or "consistory" not in metadata:
        raise AnchorCacheError("not an anchor cache: the safetensors file has no ConsiStory metadata")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise AnchorCacheError(
            f"anchor cache format version {metadata.get('format_version')} is not supported "
            f"(this version reads {FORMAT_VERSION}); create the anchors again to recreate the cache"
        )
