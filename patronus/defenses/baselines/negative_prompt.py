"""`negative-prompt`: the unsafe words as a negative prompt, the first thing many users try.

No weight changes: the pipeline's `inference.json` holds the negative prompt, which every
Patronus sampler passes to the pipeline (classifier-free guidance then steers away from it).
Anyone who calls the pipeline without it, or with their own, has no defence (`remove-filter`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from patronus.defenses.baselines.common import DEFENDER_WORDS, check_out, describe, load_baseline_config, write_defended
from patronus.errors import ConfigError
from patronus.models.inference import read_inference
from patronus.models.registry import load_pipeline, resolve_model

__all__ = ["PRESETS", "NegativePromptConfig", "describe", "load_config", "protect"]


@dataclass(frozen=True)
class NegativePromptConfig:
    words: tuple[str, ...] = DEFENDER_WORDS  # in the model's own vocabulary

    def __post_init__(self):
        if not self.words or not all(isinstance(w, str) and w.strip() for w in self.words):
            raise ConfigError(f"negative-prompt words must be a non-empty list of words, got {self.words!r}")

    @property
    def prompt(self) -> str:
        return ", ".join(self.words)


PRESETS: dict[str, dict] = {"default": {}}
DEFAULT_PRESET = "default"


def load_config(preset: str = DEFAULT_PRESET, path: str | Path | None = None, parts: str | None = None):
    return load_baseline_config(NegativePromptConfig, PRESETS, "negative-prompt", preset, path, parts)


def protect(model: str, out: Path, cfg: NegativePromptConfig, workdir: Path, resume: bool = False) -> dict:
    t0 = time.time()
    check_out(Path(out))
    pipe = load_pipeline(model)
    inference = replace(read_inference(resolve_model(model)), negative_prompt=cfg.prompt)
    return write_defended(model, Path(out), "negative-prompt", cfg, pipe, (), inference, t0)
