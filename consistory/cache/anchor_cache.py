"""The anchor cache (docs/method.md section 9): everything a new image needs from its anchors.

What is stored, and how, is the codec's (`codecs`: "exact" or "compact"), which also lists the
tensors a cache must hold (`schema`); where the bytes lie is the layout's (`layout`: one
safetensors file that splits into chunks and is read in place). Metadata (JSON in the
safetensors header): subjects, anchor prompts, seeds, config, model id and fingerprint, dtype,
codec and the format version. Loading a file never executes code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import ConsiStoryConfig
from ..method.grids import Grids
from .check import structure_problem
from .codecs import CODECS, codec_class
from .layout import (
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
from .schema import TensorSpec, UNetShapes
from .store import AnchorCacheError, TensorStore

FORMAT = "consistory.anchor_cache"
FORMAT_VERSION = 2


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
        self.store = TensorStore(self.tensors, self.storage_device)
        self._codec = codec_class(self.codec)(self.store, self.config)

    # --- recording (used while the anchors are generated) ---
    def put_shared(self, pass_index: int, layer: str, step: int, half: int, inputs: torch.Tensor, attn, grid: str) -> None:
        """The inputs of an `up` self-attention layer at the anchors' shared tokens (M, C)."""
        self._codec.put_shared(pass_index, layer, step, half, inputs, attn, grid)

    def put_tokens(self, pass_index: int, step: int, grid: str, mask: torch.Tensor) -> None:
        """The anchors' dropout masks (A, N) of a pass, step and grid."""
        self._codec.put_tokens(pass_index, step, grid, mask)

    def put_injection(self, layer: str, step: int, bank: torch.Tensor) -> None:
        self._codec.put_injection(layer, step, bank)

    def put_anchor_features(self, dift: torch.Tensor | None, masks: dict[str, torch.Tensor]) -> None:
        self._codec.put_features(dift, masks)

    def finish_recording(self) -> None:
        self._codec.finish()
        self.store.settle()

    # --- replay (used while new images are generated) ---
    def shared_inputs(self, pass_index: int, layer: str, step: int, half: int, grid: str, device=None, dtype=None):
        """(M, C) inputs of `layer` at the anchors' shared tokens, decoded on `device`."""
        return self._codec.shared_inputs(pass_index, layer, step, half, grid, device, dtype or torch.float32)

    def injection(self, layer: str, step: int, device=None, dtype=None) -> torch.Tensor:
        return self._codec.injection(layer, step, device, dtype or torch.float32)

    @property
    def dift(self) -> torch.Tensor:
        return self._codec.dift()

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return self._codec.masks()

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
        self.store.settle()
        moved = {k: v.to(device) for k, v in self.tensors.items()}
        return AnchorCache(**{**self._fields(), "tensors": moved})

    def pin_memory(self) -> "AnchorCache":
        """A copy in page-locked host memory: replay on a GPU then copies each layer's tensors
        asynchronously, overlapping the denoising work, instead of stalling at every layer."""
        self.store.settle()
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
        self.store.settle()
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

    def schema(self, unet, vae_scale_factor: int = 8, resumed: bool = True) -> list[TensorSpec]:
        """The tensors this cache holds for `unet`, by its codec (`resumed=False`: as made with
        pass 2 run from step 0)."""
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {self.dtype!r}")
        grids = Grids.for_image(self.config.height, self.config.width, vae_scale_factor)
        return codec_class(self.codec).schema(self.config, self.n_anchors, UNetShapes.of(unet), dtype, grids, resumed)

    def check_structure(self, unet, vae_scale_factor: int = 8) -> None:
        """Refuse a damaged or incomplete cache (a missing, extra or misshapen tensor for this
        UNet's layers), reading only the header; checked once per cache object."""
        if getattr(self, "_structure_ok", None) is unet:
            return
        try:
            required = self.schema(unet, vae_scale_factor)
            allowed = {spec.name for spec in self.schema(unet, vae_scale_factor, resumed=False)}
        except (ValueError, TypeError) as error:
            problem = f"its settings are unusable ({error})"
        else:
            problem = structure_problem(self.store, required, allowed)
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
