"""Training samples/s of candidate tiny-model sizes: how `patronus-tiny`'s size was chosen.

    python research/scripts/train_speed.py

One UNet + text-encoder training step (AdamW, epsilon loss on random 4x8x8 latents) and one
VAE step (MSE on random 32x32 images) per candidate, batch 64; the first step is a warm-up.
Run it with nothing else on the machine: the numbers are the budget of every training run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from patronus.models.tiny import TinyConfig, build_text_encoder, build_tokenizer, build_unet, build_vae

UNETS = {
    "(64,128) 2 layers, attention at both levels": dict(unet_channels=(64, 128), unet_layers_per_block=2,
                                                         unet_attention_levels=(True, True)),
    "(64,128) 1 layer, attention at both levels": dict(unet_channels=(64, 128), unet_layers_per_block=1,
                                                        unet_attention_levels=(True, True)),
    "(64,128) 2 layers, attention at 4x4 only": dict(unet_channels=(64, 128), unet_layers_per_block=2,
                                                      unet_attention_levels=(False, True)),
    "(96,192) 2 layers, attention at both levels": dict(unet_channels=(96, 192), unet_layers_per_block=2,
                                                         unet_attention_levels=(True, True)),
    "(64,128,128) 1 layer, attention at 4x4 and 2x2 [shipped]": {},
}
VAES = {"(32,64,64)": (32, 64, 64), "(32,64,128)": (32, 64, 128), "(16,32,64) [shipped]": (16, 32, 64)}


def unet_speed(cfg: TinyConfig, batch: int = 64, iters: int = 4) -> tuple[float, float]:
    unet, tok = build_unet(cfg), build_tokenizer(cfg)
    text = build_text_encoder(cfg, tok)
    opt = torch.optim.AdamW(list(unet.parameters()) + list(text.parameters()), 1e-4)
    ids = torch.randint(0, len(tok), (batch, cfg.max_length))
    x, t = torch.randn(batch, 4, 8, 8), torch.randint(0, 1000, (batch,))
    for i in range(iters + 1):
        if i == 1:
            t0 = time.time()
        loss = unet(x, t, text(ids)[0]).sample.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return sum(p.numel() for p in unet.parameters()) / 1e6, batch * iters / (time.time() - t0)


def vae_speed(cfg: TinyConfig, batch: int = 64, iters: int = 3) -> tuple[float, float]:
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), 1e-4)
    x = torch.randn(batch, 3, 32, 32)
    for i in range(iters + 1):
        if i == 1:
            t0 = time.time()
        vae(x).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return sum(p.numel() for p in vae.parameters()) / 1e6, batch * iters / (time.time() - t0)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # no options; --help
    torch.manual_seed(0)
    base = TinyConfig()
    for name, change in UNETS.items():
        params, speed = unet_speed(dataclasses.replace(base, **change))
        print(f"UNet {name:58s} {params:5.2f} M params  {speed:6.0f} samples/s")
    for name, channels in VAES.items():
        params, speed = vae_speed(dataclasses.replace(base, vae_channels=channels))
        print(f"VAE  {name:58s} {params:5.2f} M params  {speed:6.0f} samples/s")


if __name__ == "__main__":
    main()
