"""Batched, seeded text-to-image sampling through a stock diffusers pipeline, as it was published:
its negative prompt, SLD guidance and safety checker included (`models/inference.py`)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionPipelineSafe
from tqdm.auto import tqdm

from patronus.models.inference import InferenceConfig

# Defaults for the tiny model, chosen by the base-model benchmark (docs/results/base-model.md).
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 4.0


def _sample(pipe: StableDiffusionPipeline, prompts: list[str], gens: list[torch.Generator], steps: int,
            guidance: float, inference: InferenceConfig) -> torch.Tensor:
    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "generator": gens}
    if inference.negative_prompt:
        kwargs["negative_prompt"] = [inference.negative_prompt] * len(prompts)
    if not isinstance(pipe, StableDiffusionPipelineSafe):
        return pipe(prompts, output_type="latent", **kwargs).images
    # SLD always decodes (it has no latent output); its last step's latents are what it decoded.
    if not inference.sld_preset:
        raise ValueError("a StableDiffusionPipelineSafe needs an SLD preset and safety concept in inference.json")
    pipe.safety_concept = inference.safety_concept
    final: list[torch.Tensor] = []
    pipe(prompts, output_type="np", callback=lambda i, t, z: final.append(z), **kwargs, **inference.sld_kwargs())
    return final[-1]


@torch.no_grad()
def generate_latents(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 64,
    progress: bool = False,
    inference: InferenceConfig = InferenceConfig(),
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
        out.append(_sample(pipe, prompts[i:i + batch_size], gens, steps, guidance, inference))
    return torch.cat(out) if out else torch.zeros(0)


def _checked(pipe: StableDiffusionPipeline, x: torch.Tensor) -> np.ndarray:
    """Decoded images in [0, 1] after the pipeline's safety checker, exactly as its own call returns them."""
    checker = getattr(pipe, "safety_checker", None)
    if isinstance(pipe, StableDiffusionPipelineSafe):
        images = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
        return pipe.run_safety_checker(images, x.device, x.dtype, False)[0] if checker is not None else images
    if checker is None:
        return pipe.image_processor.postprocess(x, output_type="np")
    x, flagged = pipe.run_safety_checker(x, x.device, x.dtype)
    return pipe.image_processor.postprocess(x, output_type="np", do_denormalize=[not f for f in flagged])


@torch.no_grad()
def decode_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """(N, H, W, 3) uint8 images, decoded (and checked) exactly as the pipeline does its own latents.

    Kept apart from sampling so that saved latents can be decoded again by another decoder.
    """
    out = []
    for i in range(0, len(latents), batch_size):
        x = pipe.vae.decode(latents[i:i + batch_size] / pipe.vae.config.scaling_factor, return_dict=False)[0]
        out.append((_checked(pipe, x) * 255).round().astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


def generate(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 64,
    progress: bool = False,
    inference: InferenceConfig = InferenceConfig(),
) -> np.ndarray:
    """One image per (prompt, seed) pair as (N, H, W, 3) uint8."""
    return decode_latents(pipe, generate_latents(pipe, prompts, seeds, steps, guidance, batch_size, progress,
                                                 inference), batch_size)
