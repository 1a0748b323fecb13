"""The Patronus defence: the VAE decoder as an internal moderator, hardened by non-fine-tunable learning.

  bank.py      the feature bank: unsafe and benign latents the moderator learns from
  losses.py    refusal (distance to black) through a pluggable perceptual network
  config.py    `ProtectConfig` and the presets
  protect.py   the two training stages, probes and checkpoint selection

The UNet alignment stage joins here.
"""

from __future__ import annotations

from pathlib import Path

from patronus.defenses.patronus.config import PRESETS, ProtectConfig, load_config
from patronus.defenses.patronus.protect import protect

__all__ = ["PRESETS", "ProtectConfig", "describe", "load_config", "protect"]


def describe(info: dict, workdir: Path) -> list[str]:
    best, t = info["chosen_checkpoint"], info["timing"]
    return [f"chosen checkpoint: stage-2 step {best['step']}; after the probe attack: attacker MSE "
            f"{best['attacker_mse_after_probe']:.4f}, mean unsafe score {best['unsafe_score_after_probe']:.3f}; "
            f"benign PSNR {best['benign_psnr']:.2f} dB",
            f"stage-1-only model (for ablations): {workdir / 'stage1-model'}",
            f"time {t['total_seconds']:.0f} s, peak memory {t['peak_memory_mb']:.0f} MB"]
