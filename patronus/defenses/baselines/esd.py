"""`esd`: Erased Stable Diffusion (Gandikota et al. 2023), the concept-erasure baseline.

The UNet is fine-tuned so that, for an unsafe prompt c, its noise prediction follows the frozen
original's *negatively guided* one: eps(x_t, c) -> eps*(x_t) - eta * (eps*(x_t, c) - eps*(x_t)).
As in ESD, x_t comes from the model itself: the frozen original samples the unsafe prompt with
DDIM and stops at a random step, so no image data is needed. ESD-u trains every UNet weight
but the cross-attention (the paper's choice for global concepts such as nudity); ESD-x only the
cross-attention. The prompts are defender-split captions (held-out synonyms never seen).

What it does not do, and Patronus does: it neither refuses (an erased prompt draws whatever the
guidance leads to, not a black image) nor trains against fine-tuning, so a few hundred steps of
the attacker's denoising loss bring the concept back (the failure the literature reports).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from patronus.defenses.baselines.common import check_out, describe, load_baseline_config, write_defended
from patronus.errors import ConfigError
from patronus.models.inference import read_inference
from patronus.models.registry import load_pipeline, resolve_model
from patronus.training import make_optimizer
from patronus.world.glyphs import UNSAFE_CLASSES
from patronus.world.splits import sample

__all__ = ["PRESETS", "ESDConfig", "describe", "load_config", "protect"]

ESD_START = 3_000_000  # defender-split indices of ESD's prompts (Patronus's partitions lie below)


@dataclass(frozen=True)
class ESDConfig:
    variant: str = "x"  # "u": all but cross-attention; "x": cross-attention only
    eta: float = 1.0  # negative guidance strength
    steps: int = 600
    lr: float = 3e-4
    batch_size: int = 8
    sampler_steps: int = 10  # DDIM steps of the original's own sampling that x_t is taken from
    guidance: float = 4.0  # classifier-free guidance of that sampling
    n_prompts: int = 500
    seed: int = 0

    def __post_init__(self):
        if self.variant not in ("u", "x"):
            raise ConfigError(f"ESD variant must be u or x, got {self.variant!r}")
        if min(self.steps, self.batch_size, self.sampler_steps, self.n_prompts) < 1 or not self.lr > 0:
            raise ConfigError("ESD steps, batch_size, sampler_steps, n_prompts and lr must be positive")


PRESETS: dict[str, dict] = {"esd-u": {"variant": "u"}, "esd-x": {"variant": "x"}}
# Chosen on defender-split prompts (docs/results/field.md): ESD-x kept benign images closest to
# the original at a lower unsafe rate than ESD-u at the same lr.
DEFAULT_PRESET = "esd-x"


def load_config(preset: str = DEFAULT_PRESET, path: str | Path | None = None, parts: str | None = None):
    return load_baseline_config(ESDConfig, PRESETS, "esd", preset, path, parts)


def _trainable(unet: UNet2DConditionModel, variant: str) -> list[torch.Tensor]:
    params = []
    for name, p in unet.named_parameters():
        cross = ".attn2." in f".{name}"
        p.requires_grad_(cross if variant == "x" else not cross)
        if p.requires_grad:
            params.append(p)
    return params


def protect(model: str, out: Path, cfg: ESDConfig, workdir: Path, resume: bool = False) -> dict:
    t0 = time.time()
    check_out(Path(out))
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    pipe = load_pipeline(model)
    frozen = copy.deepcopy(pipe.unet).requires_grad_(False).eval()
    for module in (pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    unet = pipe.unet.train()
    opt = make_optimizer("adam", cfg.lr, _trainable(unet, cfg.variant))
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(cfg.sampler_steps)
    texts = [sample("defender", ESD_START + i, classes=UNSAFE_CLASSES).text for i in range(cfg.n_prompts)]

    def embed(batch: list[str]) -> torch.Tensor:
        ids = pipe.tokenizer(batch, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    empty = embed([""])
    c = unet.config
    losses = []
    for _ in tqdm(range(cfg.steps), desc=f"ESD-{cfg.variant}"):
        idx = torch.randint(0, len(texts), (cfg.batch_size,), generator=g).tolist()
        cond, uncond = embed([texts[i] for i in idx]), empty.expand(cfg.batch_size, -1, -1)
        stop = int(torch.randint(0, cfg.sampler_steps, (1,), generator=g))
        z = torch.randn((cfg.batch_size, c.in_channels, c.sample_size, c.sample_size), generator=g)
        z = z * scheduler.init_noise_sigma
        with torch.no_grad():  # x_t from the original's own sampling of the unsafe prompt
            for t in scheduler.timesteps[:stop]:
                e_u, e_c = frozen(torch.cat([z, z]), t, torch.cat([uncond, cond])).sample.chunk(2)
                z = scheduler.step(e_u + cfg.guidance * (e_c - e_u), t, z).prev_sample
            t = scheduler.timesteps[stop]
            e_u, e_c = frozen(torch.cat([z, z]), t, torch.cat([uncond, cond])).sample.chunk(2)
            target = e_u - cfg.eta * (e_c - e_u)
        loss = F.mse_loss(unet(z, t, cond).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    unet.requires_grad_(False).eval()
    record = {"esd": {"final_loss": sum(losses[-20:]) / len(losses[-20:]), "losses": losses}}
    return write_defended(model, Path(out), "esd", cfg, pipe, ("unet",), read_inference(resolve_model(model)), t0,
                          record)
