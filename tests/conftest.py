"""Shared fixtures: a miniature randomly initialised pipeline that needs no training."""

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from patronus.models.tiny import (
    TinyConfig,
    build_schedulers,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)

MINI_CONFIG = TinyConfig(vae_channels=(8, 16, 16), unet_channels=(32, 32, 32), text_hidden=32)


@pytest.fixture(scope="session")
def mini_pipeline(tmp_path_factory) -> Path:
    """A StableDiffusionPipeline directory with the tiny model's layout but random, smaller weights."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(MINI_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=build_vae(MINI_CONFIG), text_encoder=build_text_encoder(MINI_CONFIG, tokenizer), tokenizer=tokenizer,
        unet=build_unet(MINI_CONFIG), scheduler=build_schedulers()[1], safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    path = tmp_path_factory.mktemp("mini") / "pipeline"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shifted_decoder():
    """A copy of a pipeline directory whose decoder's output is shifted by a constant: the same
    UNet, text encoder and scheduler with another decoder (lighter images, a grey for black)."""
    from diffusers import AutoencoderKL

    def make(pipeline: Path, out: Path, shift: float) -> Path:
        shutil.copytree(pipeline, out)
        vae = AutoencoderKL.from_pretrained(out / "vae")
        with torch.no_grad():
            vae.decoder.conv_out.bias.add_(shift)
        vae.save_pretrained(out / "vae")
        return out

    return make
