"""The Python API: `load_pipeline`, `protect`, `evaluate`, `attack` and `sweep`, each returning a
result object instead of only writing files. The command line (`patronus.cli`) is a thin layer
over these five.

    import patronus

    pipe = patronus.load_pipeline("patronus-tiny-protected")
    result = patronus.evaluate(pipe, suite="glyph-quick", out="runs/eval")
    print(result.metrics["unsafe_rate"], result.path)

A *model* is any of: a shipped model's name (`patronus-tiny`), a diffusers pipeline directory,
a Hugging Face Hub id (`org/name`: downloaded once into the Hub cache; offline, only a cached
snapshot is used), a `StableDiffusionPipeline` object, or a `ProtectResult`
(`patronus.models.resolve`). A pipeline object that `load_pipeline` returned and that has not
been changed since is used through the directory it came from (so its inference settings and
manifest still apply); any other is saved to a temporary directory for the call (taking along
the inference settings of the directory it was loaded from, when there is one).

Settings are the package's `*Config` dataclasses (`ProtectConfig` and the baselines' configs,
`EvalConfig`, `AttackConfig`, `GridConfig` / `FieldGridConfig`), a config file (.toml, .yaml,
.json) holding any subset of their fields, or keyword overrides of those fields; nested tables
are dicts (`unet={"align_steps": 100}`). The same checks apply as on the command line, and bad
input raises a `PatronusError` subclass with the same one-line message.

This module sits on top of the package: it imports from every layer, and only the package
root (lazily), the CLI and the demo import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from patronus.errors import ConfigError
from patronus.models.resolve import as_model, load_tracked
from patronus.sweep.entry import SweepResult, sweep

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

    from patronus.attacks.config import AttackConfig
    from patronus.evaluation.harness import EvalConfig

__all__ = ["AttackResult", "EvaluateResult", "ProtectResult", "SweepResult", "attack", "evaluate", "load_pipeline",
           "protect", "sweep"]

Model = Union[str, os.PathLike, "StableDiffusionPipeline", "ProtectResult"]
ConfigSource = Union[str, os.PathLike, Mapping[str, Any], None]


# --- results -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProtectResult:
    """A protected pipeline directory: `path`, its model card (README.md) and its manifest
    (patronus.json: hashes of every weight file, what changed, the settings and records)."""

    path: Path
    model_card: Path
    manifest: dict = field(repr=False)
    defense: str = "patronus"
    workdir: Path | None = None

    def __fspath__(self) -> str:  # a ProtectResult is its pipeline directory wherever a model is taken
        return str(self.path)

    @property
    def preset(self) -> str | None:
        return self.manifest.get("preset")

    @property
    def changed_weight_files(self) -> list[str]:
        return list(self.manifest.get("changed_weight_files", []))

    def describe(self) -> list[str]:
        """The lines `patronus protect` prints about the run."""
        from patronus.defenses import load_defense

        return load_defense(self.defense).describe(self.manifest, self.workdir or self.path)


@dataclass(frozen=True)
class EvaluateResult:
    """An evaluation directory (`path`: metrics.json, records.jsonl, images/).

    `metrics` maps each metric of metrics.json to its point estimate. `unsafe_rate` is the
    fraction of images generated for the suite's unsafe prompts (every prompt group) that the
    detector calls unsafe; `refusal_rate` the fraction of those that are refusals (black);
    `false_refusal_rate` the fraction of benign prompts' images that are; `benign_class_match`
    the fraction of benign images of the asked-for class; `psnr_vs_reference` (dB, with a
    reference) the benign images against the reference model's at the same seeds. Per group or
    class: `unsafe_rate[group=held_out]`, `unsafe_rate[class=knife]`, ... `intervals` holds the
    95% bootstrap confidence intervals, `record` the whole metrics.json."""

    path: Path
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)
    record: dict = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class AttackResult:
    """An attack's output directory; `checkpoints` are pipeline directories, in step order."""

    path: Path
    checkpoints: list[Path]
    config: AttackConfig | None = field(default=None, repr=False)


# --- models ------------------------------------------------------------------------------------

def load_pipeline(model: Model, dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
    """Load a pipeline as it was saved (its class, safety checker and weights; safetensors only
    unless PATRONUS_ALLOW_PICKLE=1) from a shipped name, a directory or a Hub id (downloaded once
    into the Hub cache). A pipeline object is returned as it is."""
    return load_tracked(model, dtype)


# --- settings ------------------------------------------------------------------------------------

def _values(config: Any) -> dict:
    """A config object, a config file or a dict as plain settings."""
    from patronus.config import read_config_file, to_dict

    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return to_dict(config)
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        return read_config_file(config)
    raise ConfigError(f"config must be a *Config object, a config file or a dict, not {type(config).__name__}")


def _settings(cls: type, config: Any, overrides: dict, where: str) -> Any:
    """`config` (an instance of `cls` is used as it is) with `overrides` on top, built and checked."""
    from patronus.config import build, merge

    if isinstance(config, cls) and not overrides:
        return config
    return build(cls, merge(_values(config), overrides), where)


# --- protect -------------------------------------------------------------------------------------

def protect(model: Model, out: str | os.PathLike, *, defense: str = "patronus", preset: str | None = None,
            config: ConfigSource | object = None, parts: str | Sequence[str] | None = None,
            workdir: str | os.PathLike | None = None, resume: bool = False, **overrides: Any) -> ProtectResult:
    """Harden `model` with a defence and write the protected pipeline (with patronus.json and a
    model card) to `out`.

    `defense`: patronus (default: decoder moderator and aligned UNet) or a baseline, any name in
    `patronus.defenses.DEFENSES` (negative-prompt, checker, sld, esd, ...). `preset`: the
    defence's (patronus: quick or full, default full). `config`: a
    config object of the defence (e.g. `ProtectConfig`), used as it is, or a config file or
    dict overriding the preset. `parts` (patronus): what to harden, "decoder,unet" or a list.
    `overrides`: any of the config's fields. `workdir` (default OUT.work): checkpoints and
    caches; `resume` continues from its newest checkpoint."""
    from patronus.config import to_dict
    from patronus.defenses import load_defense

    module = load_defense(defense)
    part_list = None if parts is None else (parts if isinstance(parts, str) else ",".join(parts))
    cfg_class = type(module.load_config(module.DEFAULT_PRESET))
    if isinstance(config, cfg_class):
        if preset is not None or part_list is not None:
            raise ConfigError("give a config object or a preset and parts, not both")
        cfg = config
    else:
        path = config if isinstance(config, (str, os.PathLike)) else None
        cfg = module.load_config(preset or module.DEFAULT_PRESET, path,
                                 **({} if part_list is None else {"parts": part_list}))
        if isinstance(config, Mapping):
            overrides = {**config, **overrides}
        elif config is not None and path is None:
            raise ConfigError(f"config for {defense} must be a {cfg_class.__name__}, a config file or a dict, "
                              f"not {type(config).__name__}")
    if overrides:
        cfg = _settings(type(cfg), to_dict(cfg), overrides, "protect" if defense == "patronus" else defense)
    out = Path(out)
    work = Path(workdir) if workdir else out.with_name(out.name + ".work")
    with as_model(model) as key:
        info = module.protect(key, out, cfg, work, resume=resume)
    from patronus.modelcard import CARD_FILE

    return ProtectResult(out, out / CARD_FILE, info, defense, work)


# --- evaluate ------------------------------------------------------------------------------------

def evaluate(model: Model, out: str | os.PathLike, config: EvalConfig | ConfigSource = None, *,
             reference: Model | None = None, **settings: Any) -> EvaluateResult:
    """Generate for a prompt suite, run the detector and write metrics.json, records.jsonl and
    the images to `out`. `config`: an `EvalConfig`, a config file or a dict; `settings`: any
    of its fields (suite="glyph-quick", steps=..., unsafe_prompts="i2p.csv", ...).
    `reference`: a second model, for PSNR/SSIM of benign outputs at the same seeds."""
    from patronus.evaluation.harness import EvalConfig
    from patronus.evaluation.harness import evaluate as run_evaluation

    cfg = _settings(EvalConfig, config, settings, "evaluate")
    with contextlib.ExitStack() as stack:
        key = stack.enter_context(as_model(model))
        ref = stack.enter_context(as_model(reference, "reference")) if reference is not None else None
        record = run_evaluation(key, Path(out), cfg, reference=ref)
    metrics = {k: v.get("value") for k, v in record["metrics"].items()}
    intervals = {k: tuple(v["ci"]) for k, v in record["metrics"].items() if v.get("ci") is not None}
    return EvaluateResult(Path(out), metrics, intervals, record)


# --- attack --------------------------------------------------------------------------------------

def attack(model: Model, out: str | os.PathLike, config: AttackConfig | ConfigSource = None, *,
           progress: bool = True, **settings: Any) -> AttackResult:
    """Play one white-box attack on `model`; every checkpoint is a pipeline directory under `out`.

    `config`: an `AttackConfig`, a config file or a dict; `settings`: any of its fields
    (kind="unet-full", steps=20, lr=1e-4, optimizer="adam", save_at=(10, 20), data=...,
    swap_from=MODEL for swap-decoder). Without `save_at`, the one checkpoint is the last step."""
    from patronus.attacks.config import AttackConfig

    if isinstance(config, AttackConfig) and not settings:
        cfg = config
    else:
        values = {**_values(config), **settings}
        if isinstance(values.get("save_at"), int):
            values["save_at"] = (values["save_at"],)
        if "save_at" not in values:  # as on the command line: the last step
            values["save_at"] = (values.get("steps", AttackConfig.__dataclass_fields__["steps"].default),)
        if "kind" not in values:
            raise ConfigError("attack needs kind= (e.g. unet-full, decoder-full, joint, swap-decoder)")
        with contextlib.ExitStack() as stack:
            if values.get("swap_from") is not None:  # any model, as for `model`
                values["swap_from"] = stack.enter_context(as_model(values["swap_from"], "swap_from"))
            cfg = _settings(AttackConfig, None, values, "attack")
            return _attack(model, Path(out), cfg, progress)
    return _attack(model, Path(out), cfg, progress)


def _attack(model: Model, out: Path, cfg: AttackConfig, progress: bool) -> AttackResult:
    from patronus.attacks.registry import run_attack

    with as_model(model) as key:
        checkpoints = run_attack(key, cfg, out, progress=progress)
    return AttackResult(out, list(checkpoints), cfg)


# --- sweep ---------------------------------------------------------------------------------------
# `sweep` and `SweepResult` live in patronus/sweep/entry.py (imported above): `patronus.sweep`
# names the sweep package too, which is callable and runs the same function.
