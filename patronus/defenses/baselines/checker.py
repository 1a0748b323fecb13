"""`checker`: a post-hoc safety checker, the component Stable Diffusion ships as `safety_checker`.

`GlyphSafetyChecker` plays `StableDiffusionSafetyChecker`'s role in the glyph world: the
detector (GlyphNet) looks at every decoded image and the ones it calls unsafe come back black.
It is a diffusers `ModelMixin` saved in `safety_checker/`, so `StableDiffusionPipeline.from_pretrained`
loads and runs it exactly as it runs SD's own (import `patronus.defenses.baselines.checker`
first: diffusers loads only component classes already imported). It changes no weight the
model draws with: one line (`safety_checker=None`, the `remove-filter` attack) removes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from transformers import CLIPImageProcessor

from patronus.defenses.baselines.common import check_out, describe, load_baseline_config, write_defended
from patronus.detectors.glyphnet import UNSAFE_THRESHOLD, GlyphNet, load_glyphnet
from patronus.errors import ConfigError
from patronus.models.inference import read_inference
from patronus.models.registry import load_pipeline, resolve_model

__all__ = ["PRESETS", "CheckerConfig", "GlyphSafetyChecker", "describe", "load_config", "protect"]


class GlyphSafetyChecker(ModelMixin, ConfigMixin):
    """Called as SD's checker is: `(images, has_nsfw_concept) = checker(images=..., clip_input=...)`,
    images a tensor in [-1, 1] (StableDiffusionPipeline) or an array in [0, 1] (the SLD pipeline)."""

    @register_to_config
    def __init__(self, threshold: float = UNSAFE_THRESHOLD, glyphnet: dict | None = None):
        super().__init__()
        self.net = GlyphNet(**(glyphnet or {}))

    @torch.no_grad()
    def forward(self, clip_input: torch.Tensor, images):
        x = images if torch.is_tensor(images) else torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2) * 2 - 1
        flagged = (self.net.unsafe_score(x.float().clamp(-1, 1)) > self.config.threshold).tolist()
        for i, unsafe in enumerate(flagged):
            if unsafe:
                images[i] = torch.zeros_like(images[i]) if torch.is_tensor(images) else np.zeros(images[i].shape)
        return images, flagged


@dataclass(frozen=True)
class CheckerConfig:
    threshold: float = UNSAFE_THRESHOLD  # unsafe score above which an image is blacked out
    detector: str | None = None  # a GlyphNet saved with save_pretrained; default: the shipped one

    def __post_init__(self):
        if not 0 < self.threshold < 1:
            raise ConfigError(f"checker threshold must lie in (0, 1), got {self.threshold}")
        if self.detector is not None and not Path(self.detector).is_dir():
            raise ConfigError(f"checker detector {self.detector} is not a GlyphNet directory")


PRESETS: dict[str, dict] = {"default": {}}
DEFAULT_PRESET = "default"


def load_config(preset: str = DEFAULT_PRESET, path: str | Path | None = None, parts: str | None = None):
    return load_baseline_config(CheckerConfig, PRESETS, "checker", preset, path, parts)


def make_checker(cfg: CheckerConfig) -> GlyphSafetyChecker:
    net = load_glyphnet(cfg.detector)
    checker = GlyphSafetyChecker(cfg.threshold, {k: v for k, v in net.config.items() if not k.startswith("_")})
    checker.net.load_state_dict(net.state_dict())
    return checker.eval()


def protect(model: str, out: Path, cfg: CheckerConfig, workdir: Path, resume: bool = False) -> dict:
    t0 = time.time()
    check_out(Path(out))
    pipe = load_pipeline(model)
    size = pipe.vae.config.sample_size  # the checker reads `images`; the processor only has to be valid
    features = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    checked = type(pipe)(**(pipe.components | {"safety_checker": make_checker(cfg), "feature_extractor": features}),
                         requires_safety_checker=True)
    return write_defended(model, Path(out), "checker", cfg, checked, ("safety_checker", "feature_extractor"),
                          read_inference(resolve_model(model)), t0)
