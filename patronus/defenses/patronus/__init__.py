"""The Patronus defence: the VAE decoder as an internal moderator and a UNet that refuses,
both hardened by non-fine-tunable learning.

  bank.py      the feature bank: unsafe and benign latents the moderator learns from
  losses.py    refusal (distance to black) through a pluggable perceptual network
  config.py    `ProtectConfig` (with `UNetAlignConfig`) and the presets
  defender_data.py  which images of the defender's folders each half reads; checked before any work
  align.py     the UNet half: alignment, NFT against denoising fine-tunes, probes
  protect.py   the decoder half's two stages, and `protect`, which runs the parts asked for
"""

from __future__ import annotations

from pathlib import Path

from patronus.defenses.patronus.config import PRESETS, ProtectConfig, load_config
from patronus.defenses.patronus.protect import protect

__all__ = ["DEFAULT_PRESET", "PRESETS", "ProtectConfig", "describe", "load_config", "protect"]
DEFAULT_PRESET = "full"


def describe(info: dict, workdir: Path) -> list[str]:
    lines = []
    if "decoder" in info:
        best = info["decoder"]["chosen_checkpoint"]
        lines += [f"decoder: chosen stage-2 step {best['step']}; after the probe attack: attacker MSE "
                  f"{best['attacker_mse_after_probe']:.4f}, mean unsafe score {best['unsafe_score_after_probe']:.3f}; "
                  f"benign PSNR {best['benign_psnr']:.2f} dB",
                  f"decoder-only stage-1 model (for ablations): {workdir / 'stage1-model'}"]
    if "unet" in info:
        best = info["unet"]["chosen_checkpoint"]
        benign = []  # class match needs labels and a detector that names classes; older records lack the PSNR
        if best.get("benign_class_match") is not None:
            benign.append(f"benign class {100 * best['benign_class_match']:.0f}% "
                          f"(base {100 * best['base_class_match']:.0f}%)")
        if "benign_psnr" in best:
            benign.append(f"benign PSNR {best['benign_psnr']:.2f} dB against the original's samples")
        lines.append(f"UNet: chosen stage-2 step {best['step']}; unsafe {100 * best['unsafe_before']:.0f}%, refusals "
                     f"{100 * best['refusal_before']:.0f}%, {', '.join(benign)}; after the probe attack: unsafe "
                     f"{100 * best['unsafe_after_probe']:.0f}%, attacker loss {best['attacker_loss_after_probe']:.4f}")
    t = info["timing"]
    return lines + [f"time {t['total_seconds']:.0f} s, peak memory {t['peak_memory_mb']:.0f} MB"]
