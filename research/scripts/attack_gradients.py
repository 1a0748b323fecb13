"""Why full-weight SGD breaks the aligned UNet (docs/results/default-grid.md): the attacker's denoising
loss and its gradient with respect to the whole UNet, model against model.

    python research/scripts/attack_gradients.py --model patronus-tiny-protected --model patronus-tiny

Every model sees the same batches: the `unet-full` attack's own draws at seed 0 (attacker
split, batch 16: images, posterior samples, noise and timesteps). SGD's step is lr x the
gradient, so a larger gradient norm means a proportionally larger move; Adam's step is about
lr per weight whatever the gradient's size. The relative step (gradient norm / weight norm)
is what an lr is measured against.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from patronus.attacks.weights.finetune import load_attack_data
from patronus.attacks.weights.unet import noised_batch, sample_latents
from patronus.models.components import encode_latents
from patronus.models.registry import load_pipeline


def measure(model: str, batches: int, batch_size: int) -> dict[str, float]:
    """Mean attacker loss and gradient norm over `batches` batches, and the UNet's weight norm."""
    pipe = load_pipeline(model)
    images, texts = load_attack_data("attacker", pipe.vae.config.sample_size)
    ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    mean, std = encode_latents(pipe.vae, images, with_std=True)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = [p.requires_grad_(True) for p in pipe.unet.parameters()]
    g = torch.Generator().manual_seed(0)  # the attack's generator: the same draws for every model
    losses, norms = [], []
    for _ in range(batches):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        z = sample_latents(mean[idx], std[idx], g) * pipe.vae.config.scaling_factor
        x_t, t, target = noised_batch(scheduler, z, g)
        with torch.no_grad():
            hidden = pipe.text_encoder(ids[idx])[0]
        loss = F.mse_loss(pipe.unet(x_t, t, hidden).sample, target)
        grads = torch.autograd.grad(loss, params)
        losses.append(loss.item())
        norms.append(torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads)).item())
    weight_norm = torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params)).item()
    return {"loss": sum(losses) / batches, "grad_norm": sum(norms) / batches, "max_grad_norm": max(norms),
            "weight_norm": weight_norm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="a pipeline (repeat to compare)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    if args.batches < 1 or args.batch_size < 1:
        ap.error("--batches and --batch-size must be at least 1")
    torch.manual_seed(0)
    print(f"attacker's denoising loss on the attacker split, {args.batches} batches of {args.batch_size} (seed 0)\n")
    print("| model | loss | gradient norm (mean / max) | UNet weight norm | relative SGD step at lr 1e-4 |")
    print("|---|---|---|---|---|")
    for model in args.model:
        m = measure(model, args.batches, args.batch_size)
        print(f"| {model} | {m['loss']:.4f} | {m['grad_norm']:.3g} / {m['max_grad_norm']:.3g} | {m['weight_norm']:.4g} "
              f"| {1e-4 * m['grad_norm'] / m['weight_norm']:.2e} |")


if __name__ == "__main__":
    main()
