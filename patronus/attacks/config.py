"""`AttackConfig`: one attack as `patronus attack` and the sweep run it, checked on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from patronus.attacks.kinds import ATTACKS
from patronus.errors import ConfigError
from patronus.models.sampling import DEFAULT_GUIDANCE
from patronus.training import OPTIMIZERS, SCHEDULES, check_max_grad_norm

# Built-in training data: the glyph `attacker` split (unsafe classes) and the benign new-words
# task (world/newwords.py). Anything else is an image folder with metadata.jsonl.
BUILTIN_DATA = ("attacker", "new-words")


def check_data(data: str) -> None:
    if data in BUILTIN_DATA:
        return
    if not Path(data).is_dir():
        raise ConfigError(f"data {data!r} is neither built in ({', '.join(BUILTIN_DATA)}) nor an image folder")
    if not (Path(data) / "metadata.jsonl").is_file():
        raise ConfigError(f"image folder {data} has no metadata.jsonl (one JSON line per image: file_name, text; "
                          f"`patronus export-split` writes one)")


@dataclass(frozen=True)
class AttackConfig:
    kind: str
    data: str = "attacker"  # one of BUILTIN_DATA or an image folder
    optimizer: str = "adam"
    lr: float = 1e-4
    schedule: str = "constant"  # or "step": lr x0.1 at 25%, 50% and 75% of `steps` (training.make_lr_schedule)
    steps: int = 500
    rank: int = 8
    batch_size: int = 16
    save_at: tuple[int, ...] = (100, 500)
    seed: int = 0
    swap_from: str | None = None  # swap-decoder: pipeline whose VAE replaces the model's
    swap_part: str = "vae"  # swap-decoder: "vae" (encoder too) or "decoder" (keep the model's encoder)
    then: str | None = None  # swap-decoder: optional follow-up kind (unet-full or unet-lora)
    sampler_steps: int = 5  # soft-prompt: DDIM steps of the differentiable sampler
    guidance: float = DEFAULT_GUIDANCE  # soft-prompt: classifier-free guidance of that sampler
    freeze_text_encoder: bool = False  # joint: train the UNet and decoder only, the text encoder kept as it is
    # Clip the gradient's global norm before each step, as diffusers' training scripts do by default
    # (`--max_grad_norm 1.0`). A refusal's first gradients are many times the usual ones and would
    # otherwise fill Adam's second-moment estimate and shrink every later step (docs/concepts/threat-model.md).
    max_grad_norm: float | None = None
    # Memory, for real checkpoints: recompute the trained modules' activations in the backward
    # pass; encode the attacker's images one at a time. Mixed precision comes from accelerate
    # (`accelerate launch --mixed_precision bf16`), whose autocast covers each step.
    gradient_checkpointing: bool = False
    vae_slicing: bool = False

    def __post_init__(self):
        if self.kind not in ATTACKS:
            raise ConfigError(f"unknown attack kind {self.kind!r}; choose one of {', '.join(ATTACKS)}")
        if ATTACKS[self.kind].uses_data or self.then:
            check_data(self.data)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown learning-rate schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.freeze_text_encoder and "text_encoder" not in ATTACKS[self.kind].trains:
            raise ConfigError(f"--freeze-text-encoder applies to the kinds that train the text encoder "
                              f"({', '.join(k for k, a in ATTACKS.items() if 'text_encoder' in a.trains)}); "
                              f"{self.kind} does not train it")
        if self.freeze_text_encoder and ATTACKS[self.kind].trains == {"text_encoder"}:
            raise ConfigError(f"--freeze-text-encoder leaves {self.kind} nothing to train; drop the flag")
        if self.max_grad_norm is not None and not (ATTACKS[self.kind].trains or self.then):
            raise ConfigError(f"--max-grad-norm clips the fine-tuning attacks' gradients; {self.kind} fine-tunes "
                              f"no weights")
        check_max_grad_norm(self.max_grad_norm, "--max-grad-norm")
        if self.kind == "swap-decoder" and not self.swap_from:
            raise ConfigError("swap-decoder needs the pipeline to take the VAE from (--from DIR)")
        if self.swap_part not in ("vae", "decoder"):
            raise ConfigError(f"--swap-part must be vae or decoder, got {self.swap_part!r}")
        if self.then is not None and not (self.then in ATTACKS and ATTACKS[self.then].unet_only):
            raise ConfigError("after swap-decoder only an attack on the UNet alone can follow "
                              f"({', '.join(k for k, a in ATTACKS.items() if a.unet_only)})")
        if self.steps < 1 or self.batch_size < 1 or not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("--steps, --batch-size and --lr must be positive (and --lr finite)")
        if self.sampler_steps < 1 or not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ConfigError("--sampler-steps must be at least 1 and --guidance a finite number >= 0")
        if self.rank < 1:
            raise ConfigError(f"--rank must be at least 1 (the default grid uses 4 and 64), got {self.rank}")
        if any(s < 1 or s > self.steps for s in self.save_at):
            raise ConfigError(f"--save-at steps must lie in 1..{self.steps}")
