"""A pipeline with Stable Diffusion 1.5's component architectures and random weights.

Nothing is downloaded: the component configs below are SD 1.5's (`runwayml/stable-diffusion-v1-5`'s
`unet/`, `vae/`, `text_encoder/` and `scheduler/` config files), and the weights are drawn
from a seed. It is how the real-model paths (`protect` on image folders with VGG-19,
`evaluate` on prompt files with NudeNet, every attack) are exercised end to end without a
checkpoint, and what `benchmarks/gpu.py` times.

- `widths = "sd15"`: SD 1.5 exactly, about 860M UNet parameters; for a GPU.
- `widths = "narrow"`: the same layout (block types, levels, two layers per block, attention
  placement, cross-attention width 768, 8x VAE with 4 latent channels, the full CLIP
  ViT-L/14 text encoder) with the UNet's channels at a tenth and the VAE's at a quarter, so
  a CPU runs it in minutes.

The tokenizer is the glyph world's CLIP BPE tokenizer at CLIP's length of 77 (SD's own
vocabulary is a hub file); a word outside it still tokenises through the byte alphabet.

    python -m patronus.models.sd15 --out runs/sd15-narrow --widths narrow --resolution 64
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from patronus.config import build
from patronus.errors import ConfigError
from patronus.io import atomic_dir
from patronus.models.tokenizer import build_clip_tokenizer

WIDTHS = {  # UNet block_out_channels, VAE block_out_channels
    "sd15": ((320, 640, 1280, 1280), (128, 256, 512, 512)),
    "narrow": ((32, 64, 128, 128), (32, 64, 128, 128)),
}
CLIP_VIT_L14_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                     "projection_dim": 768}
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                  "steps_offset": 1, "prediction_type": "epsilon"}
# torchvision's vgg19.features up to relu3_4 (what the vgg19 perceptual loss reads): conv indices.
VGG19_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
               14: (256, 256), 16: (256, 256)}


@dataclass(frozen=True)
class SDShapedConfig:
    """Which widths, at which image resolution (a multiple of 64: the UNet halves 8x latents three times)."""

    widths: str = "narrow"
    resolution: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.widths not in WIDTHS:
            raise ConfigError(f"widths must be one of {', '.join(WIDTHS)}, got {self.widths!r}")
        if self.resolution < 64 or self.resolution % 64:
            raise ConfigError(f"resolution must be a positive multiple of 64, got {self.resolution}")


def build_unet(cfg: SDShapedConfig) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=cfg.resolution // 8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=WIDTHS[cfg.widths][0], layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, norm_num_groups=32, act_fn="silu", center_input_sample=False,
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
        norm_eps=1e-5,
    )


def build_vae(cfg: SDShapedConfig) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=cfg.resolution,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=WIDTHS[cfg.widths][1], layers_per_block=2, norm_num_groups=32, act_fn="silu",
        scaling_factor=0.18215,
    )


def build_pipeline(cfg: SDShapedConfig) -> StableDiffusionPipeline:
    """The pipeline with weights drawn from `cfg.seed` (no safety checker: SD's is a hub checkpoint)."""
    torch.manual_seed(cfg.seed)
    tokenizer = build_clip_tokenizer(max_length=77)
    text = CLIPTextConfig(**CLIP_VIT_L14_TEXT, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return StableDiffusionPipeline(
        vae=build_vae(cfg), text_encoder=CLIPTextModel(text), tokenizer=tokenizer, unet=build_unet(cfg),
        scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def random_vgg19(seed: int = 0) -> dict[str, torch.Tensor]:
    """VGG-19's first 16 layers with torchvision's key names and random weights (the real ones
    are a download): enough to run the `vgg19` perceptual loss end to end."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (cin, cout) in VGG19_CONVS.items():
        out[f"features.{i}.weight"] = torch.randn((cout, cin, 3, 3), generator=g) * (2 / (9 * cin)) ** 0.5
        out[f"features.{i}.bias"] = torch.zeros(cout)
    return out


def write(out: Path, cfg: SDShapedConfig) -> None:
    """`out/` the pipeline directory; `out/vgg19.safetensors` the random VGG-19 weights beside it."""
    with atomic_dir(out) as tmp:
        build_pipeline(cfg).save_pretrained(tmp)
        save_file(random_vgg19(cfg.seed), tmp / "vgg19.safetensors")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--widths", default=SDShapedConfig.widths, choices=list(WIDTHS))
    p.add_argument("--resolution", type=int, default=SDShapedConfig.resolution)
    p.add_argument("--seed", type=int, default=SDShapedConfig.seed)
    args = p.parse_args(argv)
    cfg = build(SDShapedConfig, {"widths": args.widths, "resolution": args.resolution, "seed": args.seed}, "sd15")
    write(Path(args.out), cfg)
    print(f"wrote {args.out} ({cfg.widths} widths, {cfg.resolution} px)")


if __name__ == "__main__":
    main()
