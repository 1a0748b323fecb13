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
def generate(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """One image per (prompt, seed) pair as (N, H, W, 3) uint8.

    Each image has its own generator, so an image depends only on its prompt and seed,
    never on its batch-mates or the batch size.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        images = pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                      generator=gens, output_type="np").images
        out.append((images * 255).round().astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)
