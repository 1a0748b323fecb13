"""Decoder fine-tuning attacks: what a white-box adversary does to a protected VAE decoder.

The attacker keeps the (public, unchanged) encoder and fine-tunes `post_quant_conv` and
`decoder`, fully or with a peft LoRA, to reconstruct their own unsafe images. The same
attack on a randomly initialised decoder is the *scratch reference*: a defence meets the
non-fine-tunable bar when attacking it is no easier than training from scratch
(`patronus.models.components.reinitialise` builds that decoder).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from patronus.errors import ConfigError
from patronus.models.components import DecoderHead, encode_latents
from patronus.training import OPTIMIZERS, SCHEDULES, check_max_grad_norm, make_lr_schedule, make_optimizer

LORA_TARGETS = r".*(conv1|conv2|conv_in|conv_out|conv_shortcut|conv|to_q|to_k|to_v|to_out\.0)$"


@dataclass(frozen=True)
class DecoderAttackConfig:
    """One decoder fine-tuning attack on tensors in memory (the probe and the benchmarks use it)."""

    optimizer: str = "adam"
    lr: float = 1e-4
    steps: int = 2000
    batch_size: int = 16
    lora_rank: int | None = None  # None: full fine-tuning
    save_at: tuple[int, ...] = (100, 500, 2000)
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
        if not self.save_at or any(s < 1 or s > self.steps for s in self.save_at):
            raise ConfigError(f"save_at steps must lie in 1..{self.steps}")
        check_max_grad_norm(self.max_grad_norm, "max_grad_norm")


def attack_decoder(vae: AutoencoderKL, images: torch.Tensor, attack: DecoderAttackConfig,
                   progress: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    """Fine-tune a copy of `vae`'s decoder on reconstructing `images` ([-1, 1]).

    Returns the decoder head's merged state dict at every step in `attack.save_at`; `vae`
    itself is not modified.
    """
    victim = copy.deepcopy(vae).requires_grad_(False)
    images = images.to(victim.device)
    z = encode_latents(victim, images)
    head: torch.nn.Module = DecoderHead(victim).requires_grad_(True)
    if attack.lora_rank:
        config = LoraConfig(r=attack.lora_rank, lora_alpha=attack.lora_rank, target_modules=LORA_TARGETS)
        head = get_peft_model(head, config)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = make_optimizer(attack.optimizer, attack.lr, params)
    schedule = make_lr_schedule(attack.schedule, opt, attack.steps)
    g = torch.Generator().manual_seed(attack.seed)
    saved: dict[int, dict[str, torch.Tensor]] = {}
    last = max(attack.save_at)
    for step in tqdm(range(1, last + 1), desc="decoder attack", disable=not progress, leave=False):
        idx = torch.randint(0, len(images), (attack.batch_size,), generator=g)
        loss = F.mse_loss(head(z[idx]), images[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if attack.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, attack.max_grad_norm)
        opt.step()
        if schedule is not None:
            schedule.step()
        if step in attack.save_at:
            saved[step] = _merged_state(head)
    return saved


def _merged_state(head: torch.nn.Module) -> dict[str, torch.Tensor]:
    if hasattr(head, "merge_and_unload"):
        head = copy.deepcopy(head).merge_and_unload()
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def load_head_state(vae: AutoencoderKL, state: dict[str, torch.Tensor]) -> AutoencoderKL:
    """A copy of `vae` whose decoder head carries `state` (as returned by `attack_decoder`)."""
    out = copy.deepcopy(vae)
    DecoderHead(out).load_state_dict(state)
    return out
