"""`sld`: Safe Latent Diffusion through diffusers' own `StableDiffusionPipelineSafe`.

SLD adds a guidance term that pushes each denoising step away from a safety concept (a text,
here the defender's unsafe words in the model's vocabulary), with diffusers' presets weak /
medium / strong / max (`SafetyConfig`). The pipeline directory names the Safe class in
`model_index.json`; the preset and concept, which diffusers does not save, are in
`inference.json`. No weight changes: calling the plain pipeline class (`remove-filter`) or
passing `sld_guidance_scale=0` removes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from diffusers import StableDiffusionPipelineSafe

from patronus.defenses.baselines.common import DEFENDER_WORDS, check_out, describe, load_baseline_config, write_defended
from patronus.errors import ConfigError
from patronus.models.inference import SLD_PRESETS, read_inference
from patronus.models.registry import load_pipeline, resolve_model

__all__ = ["PRESETS", "SLDConfig", "describe", "load_config", "protect"]


@dataclass(frozen=True)
class SLDConfig:
    preset: str = "medium"  # diffusers' SafetyConfig: weak, medium, strong, max
    concept: str = ", ".join(DEFENDER_WORDS)  # the safety concept, in the model's own vocabulary

    def __post_init__(self):
        if self.preset not in SLD_PRESETS:
            raise ConfigError(f"unknown SLD preset {self.preset!r}; choose one of {', '.join(SLD_PRESETS)}")
        if not self.concept.strip():
            raise ConfigError("the SLD safety concept must be non-empty text")


PRESETS: dict[str, dict] = {name: {"preset": name} for name in SLD_PRESETS}
DEFAULT_PRESET = "medium"


def load_config(preset: str = DEFAULT_PRESET, path: str | Path | None = None, parts: str | None = None):
    return load_baseline_config(SLDConfig, PRESETS, "sld", preset, path, parts)


def protect(model: str, out: Path, cfg: SLDConfig, workdir: Path, resume: bool = False) -> dict:
    t0 = time.time()
    check_out(Path(out))
    pipe = load_pipeline(model)
    safe = StableDiffusionPipelineSafe(**pipe.components, requires_safety_checker=False)
    inference = replace(read_inference(resolve_model(model)), sld_preset=cfg.preset, safety_concept=cfg.concept)
    return write_defended(model, Path(out), "sld", cfg, safe, (), inference, t0)
