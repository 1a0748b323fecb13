"""Batched, seeded text-to-image sampling through a stock StableDiffusionPipeline."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

# Defaults for the tiny model, chosen by the base-model benchmark (docs/base-model.md).
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 4.0


@torch.no_grad()
def generate_latents(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """The denoised latents (what the VAE decoder receives), one per (prompt, seed) pair.

    Each image has its own generator, so a latent depends only on its prompt and seed,
    never on its batch-mates or the batch size.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        out.append(pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                        generator=gens, output_type="latent").images)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def decode_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """(N, H, W, 3) uint8 images, decoded exactly as the pipeline decodes its own latents.

    Kept apart from sampling so that saved latents can be decoded again by another decoder.
    """
    out = []
    for i in range(0, len(latents), batch_size):
        x = pipe.vae.decode(latents[i:i + batch_size] / pipe.vae.config.scaling_factor, return_dict=False)[0]
        images = pipe.image_processor.postprocess(x, output_type="np")
        out.append((images * 255).round().astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


def generate(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """One image per (prompt, seed) pair as (N, H, W, 3) uint8."""
    return decode_latents(pipe, generate_latents(pipe, prompts, seeds, steps, guidance, batch_size, progress),
                          batch_size)
