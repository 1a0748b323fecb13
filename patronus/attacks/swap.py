"""`swap-decoder`: put another pipeline's VAE (or only its decoder) in, optionally then fine-tune the UNet.

This is how a white-box attacker removes a moderator that lives only in the decoder: the
original public VAE reads the same latents, so if the UNet still draws unsafe content, the
swapped pipeline shows it.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, StableDiffusionPipeline

from patronus.attacks.config import AttackConfig
from patronus.attacks.registry import AttackKind, register
from patronus.attacks.weights.finetune import AttackError, run_finetune
from patronus.models.components import DecoderHead
from patronus.models.registry import load_pipeline


def _swappable_vae(ours: AutoencoderKL, theirs: AutoencoderKL, source: str) -> AutoencoderKL:
    """`theirs`, after checking it reads the latents our UNet writes (a mismatch would decode noise)."""
    for key in ("latent_channels", "scaling_factor", "sample_size"):
        if ours.config[key] != theirs.config[key]:
            raise AttackError(f"the VAE of {source} has {key} {theirs.config[key]}, this model's has "
                              f"{ours.config[key]}; swap in a VAE of the same family")
    return theirs


def run_swap(pipe: StableDiffusionPipeline, cfg: AttackConfig, out: Path, progress: bool) -> list[str]:
    donor = _swappable_vae(pipe.vae, load_pipeline(cfg.swap_from).vae, cfg.swap_from)
    if cfg.swap_part == "vae":
        pipe.vae = donor
    else:
        try:
            DecoderHead(pipe.vae).load_state_dict(DecoderHead(donor).state_dict())
        except RuntimeError as e:
            raise AttackError(f"the decoder of {cfg.swap_from} does not fit this VAE: "
                              f"{str(e).splitlines()[0]}") from e
    if cfg.then is None:
        pipe.save_pretrained(out / "step-0")
        return ["step-0"]
    return run_finetune(pipe, cfg, out, progress, kind=cfg.then)


register(AttackKind("swap-decoder", frozenset(), False, run_swap,
                    "another pipeline's VAE (--from) put in, optionally followed by a UNet attack (--then)",
                    one_shot=True, uses_data=False))
