"""`uce`: Unified Concept Editing (Gandikota et al., 2024), the closed-form concept-erasure baseline.

Every cross-attention key and value projection of the UNet (`attn2.to_k`, `attn2.to_v`) is
replaced in one step by the least-squares solution of

    min_W'  sum_e |W' c_e - v_e*|^2 + sum_p |W' c_p - W c_p|^2 + lam |W' - W|^2,

    W' = (lam W + sum_e v_e* c_e^T + sum_p W c_p c_p^T) (lam I + sum_e c_e c_e^T + sum_p c_p c_p^T)^-1

(each sum weighted by `erase_scale` / `preserve_scale`). The keys c are the text encoder's output
states, token by token, as the UNet reads them: for an erased word, its last token and every
state after it (the end-of-text and padding states, which the causal encoder has fed that word),
aligned from the end with the guide text's states from its last token on, whose projections by
the original W are the targets v_e* (the guide "" is the empty prompt: the erased word then
draws what no prompt draws); for a preserved word, all its states, whose targets are their own
projections by the original W. Erased words are the defender's unsafe words (every synonym but
the held-out ones, which the evaluation keeps for itself); preserved ones are the benign and
hard-negative class words, the colours and the backgrounds.

Like ESD it neither refuses (an erased prompt draws what the guide draws) nor trains against
fine-tuning: it is the baseline for what a one-shot weight edit of cross-attention survives.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from patronus.defenses.baselines import common
from patronus.defenses.baselines.common import DEFENDER_WORDS, check_out, load_baseline_config, write_defended
from patronus.errors import ConfigError, PatronusError
from patronus.models.inference import read_inference
from patronus.models.registry import load_pipeline, resolve_model
from patronus.world.captions import allowed_words
from patronus.world.glyphs import BACKGROUND_NAMES, CLASS_NAMES, COLOR_NAMES, UNSAFE_CLASSES

__all__ = ["PRESETS", "UCEConfig", "closed_form", "describe", "load_config", "protect"]

# What the edit keeps: every benign and hard-negative class word, the colours and the backgrounds.
PRESERVE_WORDS: tuple[str, ...] = (tuple(w for cls in CLASS_NAMES if cls not in UNSAFE_CLASSES
                                         for w in allowed_words(cls, False)) + COLOR_NAMES + BACKGROUND_NAMES)
PROJECTIONS = ("attn2.to_k", "attn2.to_v")


def _words(value: object) -> bool:
    return isinstance(value, tuple) and all(isinstance(w, str) and w.strip() for w in value)


@dataclass(frozen=True)
class UCEConfig:
    erase: tuple[str, ...] = DEFENDER_WORDS  # the concepts to erase, in the model's own vocabulary
    preserve: tuple[str, ...] = PRESERVE_WORDS  # the concepts whose cross-attention keys and values stay
    guide: str = ""  # what the erased concepts are mapped to ("": the empty prompt)
    lam: float = 0.5  # the pull towards the original weights (UCE's lambda)
    erase_scale: float = 1.0
    preserve_scale: float = 1.0

    def __post_init__(self):
        if not self.erase or not _words(self.erase):
            raise ConfigError(f"uce erase must be a non-empty list of words, got {self.erase!r}")
        if not _words(self.preserve):
            raise ConfigError(f"uce preserve must be a list of words, got {self.preserve!r}")
        if both := sorted(set(self.erase) & set(self.preserve)):
            raise ConfigError(f"uce cannot both erase and preserve {', '.join(both)}")
        if self.guide.strip() in self.erase:
            raise ConfigError(f"the uce guide {self.guide!r} is one of the erased concepts")
        for name in ("lam", "erase_scale", "preserve_scale"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"uce {name} must be a positive number, got {getattr(self, name)!r}")


PRESETS: dict[str, dict] = {"default": {}}
DEFAULT_PRESET = "default"


def load_config(preset: str = DEFAULT_PRESET, path: str | Path | None = None, parts: str | None = None):
    return load_baseline_config(UCEConfig, PRESETS, "uce", preset, path, parts)


def closed_form(weight: torch.Tensor, erase_keys: torch.Tensor, erase_values: torch.Tensor,
                preserve_keys: torch.Tensor, lam: float, erase_scale: float = 1.0,
                preserve_scale: float = 1.0) -> torch.Tensor:
    """UCE's edited projection (out x in) from the original `weight`: keys are rows (n x in),
    `erase_values` the targets of `erase_keys` (n x out); preserved keys keep `weight`'s outputs.
    Solved in float64 and returned in `weight`'s dtype."""
    w = weight.detach().double()
    ce, ve, cp = erase_keys.double(), erase_values.double(), preserve_keys.double()
    lhs = lam * w + erase_scale * ve.T @ ce + preserve_scale * (cp @ w.T).T @ cp
    gram = (lam * torch.eye(w.shape[1], dtype=torch.float64) + erase_scale * ce.T @ ce
            + preserve_scale * cp.T @ cp)
    return torch.linalg.solve(gram, lhs.T).T.to(weight.dtype)  # lhs @ gram^-1, gram symmetric


def _states(pipe: StableDiffusionPipeline, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """The text encoder's output states (n x length x dim) and each text's last-token position
    (before the end-of-text token; 0, the start token, for the empty text)."""
    tokens = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = pipe.text_encoder(tokens.input_ids.to(pipe.text_encoder.device))[0].float().cpu()
    return states, [int(n) - 2 for n in tokens.attention_mask.sum(1)]


def concept_keys(pipe: StableDiffusionPipeline, cfg: UCEConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(erased keys, the guide's states they are mapped to, preserved keys), rows of text-encoder states."""
    states, last = _states(pipe, [*cfg.erase, cfg.guide])
    guide, g = states[-1], last[-1]
    length = states.shape[1]
    erase, target = [], []
    for e in range(len(cfg.erase)):
        far = max(last[e], g)  # both from their last token on, cut to the same length at the end
        erase.append(states[e, last[e]:length - (far - last[e])])
        target.append(guide[g:length - (far - g)])
    preserve = (_states(pipe, list(cfg.preserve))[0].flatten(0, 1) if cfg.preserve
                else torch.zeros(0, states.shape[2]))
    return torch.cat(erase), torch.cat(target), preserve


def cross_attention_projections(unet: torch.nn.Module, dim: int) -> dict[str, torch.nn.Linear]:
    """Every cross-attention key and value projection that reads the text encoder's states."""
    return {name: m for name, m in unet.named_modules()
            if name.endswith(PROJECTIONS) and isinstance(m, torch.nn.Linear) and m.in_features == dim}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def protect(model: str, out: Path, cfg: UCEConfig, workdir: Path, resume: bool = False) -> dict:
    t0 = time.time()
    check_out(Path(out))
    pipe = load_pipeline(model)
    erase, guide, preserve = concept_keys(pipe, cfg)
    layers = cross_attention_projections(pipe.unet, erase.shape[1])
    if not layers:
        raise PatronusError(f"uce edits the UNet's cross-attention key and value projections; {model} has none "
                            f"that read its text encoder's {erase.shape[1]}-dim states")
    before, after, kept = [], [], []
    with torch.no_grad():
        for layer in layers.values():
            w = layer.weight.detach().float().cpu()
            targets = guide @ w.T
            new = closed_form(w, erase, targets, preserve, cfg.lam, cfg.erase_scale, cfg.preserve_scale)
            before.append(_relative(erase @ w.T, targets))
            after.append(_relative(erase @ new.T, targets))
            if len(preserve):
                kept.append(_relative(preserve @ new.T, preserve @ w.T))
            layer.weight.copy_(new.to(layer.weight))
    record = {"uce": {"edited": sorted(layers), "erase_states": len(erase), "preserve_states": len(preserve),
                      # |W c_e - v*| / |v*| over each projection, before and after; |W' c_p - W c_p| / |W c_p|
                      "erase_error_before": sum(before) / len(before), "erase_error_after": sum(after) / len(after),
                      "preserve_change": sum(kept) / len(kept) if kept else 0.0}}
    return write_defended(model, Path(out), "uce", cfg, pipe, ("unet",), read_inference(resolve_model(model)), t0,
                          record)


def describe(info: dict, workdir: Path) -> list[str]:
    u = info["uce"]
    return common.describe(info, workdir) + [
        f"uce: {len(u['edited'])} cross-attention projections edited; erased states' distance to the guide's "
        f"outputs {100 * u['erase_error_before']:.0f}% -> {100 * u['erase_error_after']:.0f}%, preserved outputs "
        f"changed by {100 * u['preserve_change']:.1f}%"]
