"""UNet fine-tuning attacks on tensors in memory, and the denoising loss every UNet attacker uses.

`noised_batch` is the one place the attacker's denoising objective is written (noise, then
timestep, drawn from the caller's generator, as diffusers' text-to-image script does): the
pipeline attacks (`finetune.py`), the defender's simulated attacker and the probes of
`patronus protect` all call it, so the simulated attacker cannot drift from the real one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from patronus.errors import ConfigError
from patronus.training import OPTIMIZERS, SCHEDULES, check_max_grad_norm, make_lr_schedule, make_optimizer

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def noised_batch(scheduler: DDPMScheduler, x0: torch.Tensor,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, target) for scaled clean latents `x0`: the denoising loss is mse(unet(x_t, t), target)."""
    noise = torch.randn(x0.shape, generator=g).to(x0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=g).to(x0.device)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:
        raise ConfigError(f"UNet attacks train epsilon or v_prediction models, this one predicts "
                          f"{scheduler.config.prediction_type}")
    return scheduler.add_noise(x0, noise, t), t, target


def sample_latents(mean: torch.Tensor, std: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A draw from the encoder's posterior, as the attacker's training loop takes it (unscaled)."""
    return mean + std * torch.randn(mean.shape, generator=g).to(mean)


@dataclass(frozen=True)
class UNetAttackConfig:
    """One full-weight or LoRA denoising fine-tune of a UNet in memory (the probes use it)."""

    optimizer: str = "adam"
    lr: float = 1e-4
    steps: int = 100
    batch_size: int = 16
    lora_rank: int | None = None  # None: full fine-tuning
    seed: int = 0
    schedule: str = "constant"  # or "step": lr x0.1 at 25%, 50% and 75% of `steps`
    max_grad_norm: float | None = None  # clip each step's gradient norm, as diffusers' scripts do (1.0)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown learning-rate schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or (self.lora_rank is not None and self.lora_rank < 1):
            raise ConfigError("steps, batch_size, lr and lora_rank must be positive")
        check_max_grad_norm(self.max_grad_norm, "max_grad_norm")


def attack_unet(unet: UNet2DConditionModel, scheduler: DDPMScheduler, mean: torch.Tensor, std: torch.Tensor,
                hidden: torch.Tensor, scale: float, attack: UNetAttackConfig,
                progress: bool = False) -> UNet2DConditionModel:
    """A fine-tuned copy of `unet` (LoRA merged) on the attacker's denoising loss; `unet` is untouched.

    `mean`/`std` are the encoder posterior of the attacker's images (unscaled), `hidden` the
    text encoder's states of their captions, `scale` the VAE's scaling factor.
    """
    victim: torch.nn.Module = copy.deepcopy(unet).requires_grad_(not attack.lora_rank)
    if attack.lora_rank:
        victim = get_peft_model(victim, LoraConfig(r=attack.lora_rank, lora_alpha=attack.lora_rank,
                                                   init_lora_weights="gaussian", target_modules=UNET_LORA_TARGETS))
    victim.train()
    params = [p for p in victim.parameters() if p.requires_grad]
    opt = make_optimizer(attack.optimizer, attack.lr, params)
    schedule = make_lr_schedule(attack.schedule, opt, attack.steps)
    g = torch.Generator().manual_seed(attack.seed)
    for _ in tqdm(range(attack.steps), desc="UNet attack", disable=not progress, leave=False):
        idx = torch.randint(0, len(mean), (attack.batch_size,), generator=g)
        x_t, t, target = noised_batch(scheduler, sample_latents(mean[idx], std[idx], g) * scale, g)
        loss = F.mse_loss(victim(x_t, t, hidden[idx], return_dict=False)[0], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if attack.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, attack.max_grad_norm)
        opt.step()
        if schedule is not None:
            schedule.step()
    if attack.lora_rank:
        victim = victim.merge_and_unload()
    return victim.requires_grad_(False).eval()
