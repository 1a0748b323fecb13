"""Architecture of `patronus-tiny`: stock diffusers/transformers classes at glyph-world size.

Nothing here is a custom module: the UNet, VAE, text encoder and tokenizer are the same
classes Stable Diffusion uses, so every tool that attacks or protects SD works unchanged.
Sizes were chosen by measuring training samples/s on the 2-core CPU (see docs/results/base-model.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from patronus.models.tokenizer import build_clip_tokenizer


@dataclass(frozen=True)
class TinyConfig:
    """The knobs of the tiny model; defaults are the shipped model's."""

    resolution: int = 32
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 3 levels -> 4x downsampling -> 8x8 latents
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers_per_block: int = 1
    unet_attention_levels: tuple[bool, ...] = (False, True, True)  # cross-attention at 4x4 and 2x2
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 16


def build_vae(cfg: TinyConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=8,
        sample_size=cfg.resolution,
    )


def build_tokenizer(cfg: TinyConfig) -> CLIPTokenizer:
    return build_clip_tokenizer(max_length=cfg.max_length)


def build_text_encoder(cfg: TinyConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=cfg.text_hidden,
    )
    return CLIPTextModel(config)


def build_unet(cfg: TinyConfig) -> UNet2DConditionModel:
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.unet_attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.unet_attention_levels))
    return UNet2DConditionModel(
        sample_size=cfg.resolution // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=32,
        norm_num_groups=32,
    )


def build_schedulers() -> tuple[DDPMScheduler, DDIMScheduler]:
    """Training scheduler (DDPM) and the sampler the pipeline ships with (DDIM)."""
    kwargs = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                  beta_end=0.012, prediction_type="epsilon")
    ddim = DDIMScheduler(**kwargs, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return DDPMScheduler(**kwargs), ddim
