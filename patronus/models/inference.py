"""What a pipeline does at sampling time beyond its weights: a negative prompt, Safe Latent
Diffusion (SLD) guidance, a safety checker.

Inference-time defences (the baselines `negative-prompt`, `sld`, `checker`) change no weight
the UNet or decoder hold; they live in how the pipeline is *called*. A safety checker is a
pipeline component (`safety_checker/`, which diffusers itself runs); SLD is diffusers' own
`StableDiffusionPipelineSafe` class in `model_index.json`, but its preset and safety concept
are call arguments diffusers does not save; a negative prompt is a call argument too. Those
call arguments are kept in `inference.json` in the pipeline directory, so that everything that
samples (`generate`, `evaluate`, the sweep, the attacks' probes) samples the model as it was
published, and so that an attack that fine-tunes weights keeps them (the attacker changed
weights, not how the pipeline is called). The `remove-filter` attack drops all three: that is
one line of code for a white-box attacker.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from patronus.errors import ConfigError

INFERENCE_FILE = "inference.json"
# diffusers' SafetyConfig presets (pipelines/deprecated/stable_diffusion_safe), by name.
SLD_PRESETS = ("weak", "medium", "strong", "max")


@dataclass(frozen=True)
class InferenceConfig:
    negative_prompt: str | None = None
    sld_preset: str | None = None  # one of SLD_PRESETS: the pipeline must be StableDiffusionPipelineSafe
    safety_concept: str | None = None  # SLD's concept text, in the model's own vocabulary

    def __post_init__(self):
        if self.sld_preset is not None and self.sld_preset not in SLD_PRESETS:
            raise ConfigError(f"unknown SLD preset {self.sld_preset!r}; choose one of {', '.join(SLD_PRESETS)}")
        if (self.safety_concept is None) != (self.sld_preset is None):
            raise ConfigError("SLD needs both a preset and a safety concept")
        for name in ("negative_prompt", "safety_concept"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise ConfigError(f"{name} must be non-empty text, got {value!r}")

    @property
    def empty(self) -> bool:
        return self == InferenceConfig()

    def sld_kwargs(self) -> dict:
        """The call arguments of the SLD preset (diffusers' SafetyConfig)."""
        from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

        return dict(getattr(SafetyConfig, self.sld_preset.upper())) if self.sld_preset else {}


def read_inference(model_dir: str | Path) -> InferenceConfig:
    """The pipeline's inference-time settings (none when it has no inference.json)."""
    path = Path(model_dir) / INFERENCE_FILE
    if not path.is_file():
        return InferenceConfig()
    try:
        values = json.loads(path.read_text())
        return InferenceConfig(**values)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise ConfigError(f"{path} is not a valid inference settings file ({e.__class__.__name__}: {e}); "
                          f"fields: {', '.join(InferenceConfig.__dataclass_fields__)}") from e


def write_inference(model_dir: str | Path, cfg: InferenceConfig) -> None:
    path = Path(model_dir) / INFERENCE_FILE
    if cfg.empty:
        path.unlink(missing_ok=True)
    else:
        path.write_text(json.dumps({k: v for k, v in asdict(cfg).items() if v is not None}, indent=2))


def copy_inference(source: str | Path, dest: str | Path) -> None:
    """Give a pipeline written from `source` (an attacked checkpoint) the same inference settings."""
    if (Path(source) / INFERENCE_FILE).is_file():
        shutil.copyfile(Path(source) / INFERENCE_FILE, Path(dest) / INFERENCE_FILE)
