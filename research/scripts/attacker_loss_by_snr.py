"""Where does a refusing UNet's large first attacker loss sit in the noise schedule?

The unclipped Adam attacker is damped by a refusal's first gradients (docs/results/distillation.md,
"Gradient clipping and Adam's memory"): a first loss 15-30 times the filtered model's fills Adam's
second moment. A refusal learned as "erase the image to the refusal latent" is asked, at a lightly
noised image, for a noise prediction sqrt(SNR) times the distance of the two clean latents, so the
excess loss should come from the less noisy timesteps. This script measures the attacker's own
denoising loss at the untouched weights (the attacker split, its captions, the attack's latent draws),
binned by the timestep's signal-to-noise ratio, for each model: the share of the excess above an SNR
says how much a refusal held only below that SNR would leave of the first loss.

    python research/scripts/attacker_loss_by_snr.py --model filtered=patronus-tiny-filtered \\
        --model candidate=runs/unet-full-bi-fresh-marked --batches 16
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from patronus.attacks.weights.finetune import load_attack_data
from patronus.attacks.weights.unet import sample_latents
from patronus.models.components import encode_latents
from patronus.models.registry import load_pipeline

EDGES = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, float("inf"))


@torch.no_grad()
def loss_by_snr(model: str, batches: int, batch_size: int, seed: int) -> tuple[list[float], list[int]]:
    """Summed per-sample attacker loss and sample count in each SNR bin of `EDGES`."""
    pipe = load_pipeline(model)
    images, texts = load_attack_data("attacker", pipe.vae.config.sample_size)
    ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    mean, std = encode_latents(pipe.vae, images, with_std=True)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    abar = sched.alphas_cumprod
    scale = pipe.vae.config.scaling_factor
    g = torch.Generator().manual_seed(seed)
    sums, counts = [0.0] * (len(EDGES) - 1), [0] * (len(EDGES) - 1)
    for _ in range(batches):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        z = sample_latents(mean[idx], std[idx], g) * scale
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=g)
        x_t = sched.add_noise(z, noise, t)
        pred = pipe.unet(x_t, t, pipe.text_encoder(ids[idx])[0]).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        snr = abar[t] / (1 - abar[t])
        for k in range(len(EDGES) - 1):
            m = (snr >= EDGES[k]) & (snr < EDGES[k + 1])
            sums[k] += per[m].sum().item()
            counts[k] += int(m.sum())
    return sums, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=PATH; the first is the reference")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        rows[name] = loss_by_snr(path, args.batches, args.batch_size, args.seed)
    bins = [f"[{EDGES[k]:g}, {EDGES[k + 1]:g})" for k in range(len(EDGES) - 1)]
    print("mean attacker loss by SNR bin (samples per bin:",
          ", ".join(f"{b} {c}" for b, c in zip(bins, next(iter(rows.values()))[1])), ")")
    print("| model | " + " | ".join(bins) + " | all | share of the excess above SNR 1 |")
    print("|---" * (len(bins) + 3) + "|")
    ref_sums, _ = next(iter(rows.values()))
    for name, (sums, counts) in rows.items():
        means = [s / c if c else float("nan") for s, c in zip(sums, counts)]
        total = sum(sums) / sum(counts)
        excess = [s - r for s, r in zip(sums, ref_sums)]
        above = sum(e for e, lo in zip(excess, EDGES) if lo >= 1.0)
        share = above / sum(excess) if sum(excess) > 0 else float("nan")
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in means) + f" | {total:.3f} | {share:.2f} |")


if __name__ == "__main__":
    main()
