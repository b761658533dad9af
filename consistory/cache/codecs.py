"""The anchor-cache codecs: how a cache stores what the anchors share and gives it back on replay.

Both record the same things (docs/method.md section 9): the input of every `up` self-attention
layer at the tokens of the anchors' dropout masks, per pass, step and CFG half; the injection
sources; the anchors' DIFT features and final masks. Pass 2 resumes from pass 1 at step S // 10,
so pass 2 holds steps S // 10 .. S - 1 only.

- "exact" (`exact_codec`): every tensor as computed, in the model's dtype.
- "compact" (`compact_codec`): 8 bits or fewer per value, decoded on the device layer by layer.

Each codec also lists the tensors it makes (`Codec.schema`), which the structure check and the
byte counter read.
"""

from __future__ import annotations

from .codec_base import Codec
from .compact_codec import CompactCodec
from .exact_codec import ExactCodec

CODEC_CLASSES: dict[str, type[Codec]] = {"exact": ExactCodec, "compact": CompactCodec}
CODECS = tuple(CODEC_CLASSES)


def codec_class(name: str) -> type[Codec]:
    try:
        return CODEC_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown anchor cache codec {name!r}; choose one of {', '.join(CODECS)}") from None
