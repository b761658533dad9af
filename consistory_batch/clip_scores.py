"""CLIP embeddings for scoring: any CLIP checkpoint (hub id or local directory), or a tiny random
CLIP built locally for offline smoke runs (`--clip tiny`, like `--model tiny`: its scores mean
nothing, but every code path runs).
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

# The tiny CLIP: the local tokenizer's text tower at the tiny SDXL preset's size, and a
# 32-pixel vision tower of 4 x 4 patches.
_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
_TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4)
_TINY_PROJECTION = 16


def _pil_image_processor():
    """CLIP's PIL image processor class: the PIL backend by its own name where transformers has
    one (asking for CLIPImageProcessor without torchvision warns and falls back to it)."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


class ClipEmbedder:
    """Unit-norm CLIP embeddings of images and texts, in the model's shared space."""

    def __init__(self, model, tokenizer, processor, name: str, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name
        self.device = torch.device(device)

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu") -> "ClipEmbedder":
        from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

        from consistory.presets.sdxl import local_text_config
        from consistory.presets.tokenizer import build_local_clip_tokenizer

        tokenizer = build_local_clip_tokenizer()
        config = CLIPConfig(text_config=local_text_config(_TINY_TEXT, tokenizer).to_dict(),
                            vision_config=CLIPVisionConfig(**_TINY_VISION).to_dict(),
                            projection_dim=_TINY_PROJECTION)
        with torch.random.fork_rng(devices=[]):  # same seed, same weights; the caller's RNG untouched
            torch.manual_seed(seed)
            model = CLIPModel(config)
        size = _TINY_VISION["image_size"]
        processor = _pil_image_processor()(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return cls(model, tokenizer, processor, "tiny", device)

    @classmethod
    def load(cls, name: str, device: str | torch.device = "cpu", cache_only: bool = False) -> "ClipEmbedder":
        from transformers import CLIPModel, CLIPTokenizer

        model = CLIPModel.from_pretrained(name, local_files_only=cache_only)
        tokenizer = CLIPTokenizer.from_pretrained(name, local_files_only=cache_only)
        processor = _pil_image_processor().from_pretrained(name, local_files_only=cache_only)
        return cls(model, tokenizer, processor, name, device)

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit vectors, one per image."""
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        features = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
        return _unit(_embeds(features))

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit vectors, one per text (cut at CLIP's 77 tokens)."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        features = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                attention_mask=tokens["attention_mask"].to(self.device))
        return _unit(_embeds(features))


def _embeds(features) -> torch.Tensor:
    # transformers returns the projected embeddings as a tensor, or (5.x) as the pooler output.
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu()
