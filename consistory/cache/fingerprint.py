"""The model fingerprint that anchor caches are checked against."""

from __future__ import annotations

import hashlib
import json

import torch


def unet_fingerprint(sdxl) -> str:
    """Identifies the UNet (architecture and a sample of its weights), independent of the
    process and of the dtype the weights are held in (diffusers' private config keys are left
    out: some are built from sets; the weights are hashed in fp16)."""
    unet = sdxl.unet
    public = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode())
    for weight in _fingerprint_weights(sdxl):
        sample = weight.detach().reshape(-1)[:: max(1, weight.numel() // 4096)]
        digest.update(sample.to("cpu", torch.float16).numpy().tobytes())
    return digest.hexdigest()[:16]


def _fingerprint_weights(sdxl) -> list[torch.Tensor]:
    """A few weights spread over the UNet and the text encoders, so that fine-tunes (LoRA fused
    into attention, say) change the fingerprint, not only a different base model."""
    unet = sdxl.unet
    attention = [
        weight
        for name, module in unet.named_modules()
        if name.endswith(("attn1", "attn2")) and name.startswith(("up_blocks", "mid_block"))
        for weight in (module.to_k.weight, module.to_v.weight)
    ]
    picks = [unet.conv_in.weight, unet.conv_out.weight] + attention[:: max(1, len(attention) // 8)]
    for encoder in (sdxl.text_encoder, sdxl.text_encoder_2):
        if encoder is not None:
            picks.append(encoder.get_input_embeddings().weight)
    return picks
