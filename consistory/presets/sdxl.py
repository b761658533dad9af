"""Offline SDXL pipelines with random weights: the SDXL topology at three sizes.

Every preset is a stock ``StableDiffusionXLPipeline`` (same block types, both text encoders,
micro-conditioning, VAE scale factor 8, FreeU-compatible up blocks), so code that works on a
preset works unchanged on real SDXL weights. Nothing here reads files or touches the network.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from . import PRESETS
from .tokenizer import build_local_clip_tokenizer, local_vocab_size

# What makes a UNet "SDXL": no attention at the highest resolution, two cross-attention levels,
# SDXL's text/time micro-conditioning. Shared by every preset; only the sizes below differ.
_SDXL_UNET_TOPOLOGY: dict[str, Any] = dict(
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    layers_per_block=2,
    use_linear_projection=True,
    addition_embed_type="text_time",
    flip_sin_to_cos=True,
    freq_shift=0,
    norm_eps=1e-5,
)

# attention_head_dim is, for historical reasons, the number of *heads* per level in diffusers
# (SDXL's [5, 10, 20] gives 64-dim heads); num_attention_heads is rejected by UNet2DConditionModel.
_UNET_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        block_out_channels=(32, 64, 64),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        addition_time_embed_dim=8,
        norm_num_groups=32,
        sample_size=8,  # 64 px
    ),
    "small": dict(
        block_out_channels=(128, 256, 512),
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 8),
        addition_time_embed_dim=32,
        norm_num_groups=32,
        sample_size=32,  # 256 px
    ),
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "full": dict(
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        addition_time_embed_dim=256,
        norm_num_groups=32,
        sample_size=128,  # 1024 px
    ),
}

# Four levels in every preset: the pipeline derives vae_scale_factor = 2 ** (levels - 1) = 8.
_VAE_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64),
    "small": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=32, sample_size=256),
    "full": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024),
}

# (text_encoder, text_encoder_2). Both need >= 2 layers: SDXL conditions on hidden_states[-2].
# "full" is CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, as in SDXL base.
_TEXT_SIZES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "tiny": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, projection_dim=32),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, projection_dim=32),
    ),
    "small": (
        dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, projection_dim=256),
        dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, projection_dim=256),
    ),
    "full": (
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
             projection_dim=768, hidden_act="quick_gelu", vocab_size=49408),
        dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
             projection_dim=1280, hidden_act="gelu", vocab_size=49408),
    ),
}

# SDXL base's scheduler settings, with DDIM in place of its default Euler sampler.
_SDXL_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    timestep_spacing="leading",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
)
_SDXL_VAE_SCALING_FACTOR = 0.13025


def unet_config(name: str) -> dict[str, Any]:
    """The full UNet2DConditionModel config of preset ``name`` (handy for meta-device checks)."""
    _check_name(name)
    text_1, text_2 = _TEXT_SIZES[name]
    sizes = _UNET_SIZES[name]
    return {
        **_SDXL_UNET_TOPOLOGY,
        **sizes,
        # SDXL cross-attends to both encoders' hidden states concatenated on the feature axis.
        "cross_attention_dim": text_1["hidden_size"] + text_2["hidden_size"],
        # 6 micro-conditioning numbers (original size, crop, target size) + text_encoder_2's pooled embedding.
        "projection_class_embeddings_input_dim": 6 * sizes["addition_time_embed_dim"] + text_2["projection_dim"],
    }


def _check_name(name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def local_text_config(sizes: dict[str, Any], tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """A CLIP text encoder's config for the local tokenizer (also the eval's tiny CLIP)."""
    return CLIPTextConfig(
        **{"vocab_size": local_vocab_size(), "hidden_act": "quick_gelu", **sizes},
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        # Pooling finds the first eos_token_id in input_ids, so it must be the local tokenizer's id,
        # not 49407 (which this tokenizer never emits).
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae(name: str) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        scaling_factor=_SDXL_VAE_SCALING_FACTOR,
        force_upcast=True,  # SDXL's VAE overflows in fp16; the pipeline decodes in fp32
        **_VAE_SIZES[name],
    )


def build_preset_sdxl(
    name: str,
    seed: int = 0,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    on_device: bool = False,
) -> StableDiffusionXLPipeline:
    """A randomly initialised SDXL pipeline of preset ``name``; same ``seed``, same weights.

    - ``"tiny"``: seconds-fast on CPU at 64 px; for unit tests and smoke runs.
    - ``"small"``: 256 px, large enough that tensor work dominates Python overhead; for CPU benchmarks.
    - ``"full"``: SDXL base 1.0's exact architecture (~2.6e9 UNet parameters); for GPU memory and
      throughput measurements without downloading weights. Built in fp32 on the CPU first: ~14 GB
      of host RAM and about a minute.

    ``on_device``: create and initialise the weights on ``device`` itself, with that device's
    random generator: seconds for "full" on a GPU. The weights are then not those of the CPU
    build (so neither is the model fingerprint): for benchmarks, where only the shapes matter.
    """
    _check_name(name)
    tokenizer = build_local_clip_tokenizer()
    # SDXL's second tokenizer pads with "!" rather than end-of-text; kept for fidelity.
    tokenizer_2 = build_local_clip_tokenizer(pad_token="!")
    text_1, text_2 = _TEXT_SIZES[name]

    def place(module: torch.nn.Module) -> torch.nn.Module:
        # Move each module as soon as it exists so "full" never holds two fp32 copies of everything.
        # dtype only when it changes: diffusers' ModelMixin.to warns on any dtype argument.
        cast = {} if torch_dtype == torch.float32 else {"dtype": torch_dtype}
        return module.to(device=device, **cast).eval()

    # Initialise on the CPU generator only, in a fixed order, so weights do not depend on the
    # device; fork_rng leaves the caller's global RNG state untouched.
    target = torch.device(device)
    where = torch.device(target) if on_device else contextlib.nullcontext()
    generators = [target.index or 0] if on_device and target.type == "cuda" else []
    with torch.random.fork_rng(devices=generators, device_type=target.type), where:
        torch.manual_seed(seed)
        text_encoder = place(CLIPTextModel(local_text_config(text_1, tokenizer)))
        text_encoder_2 = place(CLIPTextModelWithProjection(local_text_config(text_2, tokenizer_2)))
        unet = place(UNet2DConditionModel(**unet_config(name)))
        vae = place(_vae(name))

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=DDIMScheduler(**_SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        # Random weights make a watermark meaningless, and this keeps the output independent of
        # whether the optional invisible-watermark package happens to be installed.
        add_watermarker=False,
    )


def build_preset_controlnet(unet: UNet2DConditionModel, seed: int = 0):
    """A random SDXL ControlNet for a preset's UNet: its encoder copied from the UNet (as
    `ControlNetModel.from_unet` does), and random weights in the convolutions a ControlNet starts
    with at zero, so that a control image changes the image in tests and benchmarks."""
    from diffusers import ControlNetModel

    # Same seed, same weights: the layers from_unet does not copy are drawn here too.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet)
        for conv in [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block,
                     *controlnet.controlnet_down_blocks]:
            conv.reset_parameters()
    # dtype only when it changes: diffusers' ModelMixin.to warns on any dtype argument.
    cast = {} if unet.dtype == torch.float32 else {"dtype": unet.dtype}
    return controlnet.to(device=unet.device, **cast).eval()
