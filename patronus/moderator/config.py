"""Settings of `patronus protect`: presets, and TOML/YAML config files users can commit.

A config file holds any subset of the fields below (nested tables for `bank` and
`attacks`); unknown keys are an error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from patronus.moderator.features import BankSettings
from patronus.nft.simulated import AttackSpace


@dataclass(frozen=True)
class ProtectConfig:
    seed: int = 0
    perceptual: str = "glyphnet"  # glyphnet | vgg19 | mse
    vgg_weights: str | None = None
    bank: BankSettings = field(default_factory=BankSettings)
    batch_size: int = 32
    # Stage 1 (unlearn): L = w_refuse_img * L_refuse(images) + w_rec * L_rec
    #                       + w_refuse_feat * L_refuse(UNet latents) + w_cal * L_cal
    stage1_steps: int = 2000
    stage1_lr: float = 3e-4  # peak of a cosine schedule after `stage1_warmup` steps
    stage1_warmup: int = 100
    stage1_w_refuse_img: float = 0.1
    stage1_w_refuse_feat: float = 1.0
    stage1_w_rec: float = 0.2
    stage1_w_cal: float = 2.0
    # Stage 2 (non-fine-tunable): L = w_nft * L_nft + w_rec * L_rec + w_refuse * L_refuse + w_cal * L_cal
    stage2_steps: int = 300
    stage2_lr: float = 5e-5
    stage2_w_nft: float = 0.1
    stage2_w_refuse: float = 0.3
    stage2_w_rec: float = 0.2
    stage2_w_cal: float = 2.0
    query_batch: int = 32
    second_order: bool = False  # full MAML for plain-SGD full-parameter attacks
    attacks: AttackSpace = field(default_factory=AttackSpace)
    # Probes: a real decoder fine-tuning attack on the probe partition every `probe_every` steps.
    probe_every: int = 50
    probe_optimizer: str = "adam"
    probe_lr: float = 1e-4
    probe_steps: int = 100
    probe_batch: int = 16
    min_benign_psnr: float = 31.0  # below it, a checkpoint's score is penalised (1 dB margin over the bar)
    checkpoint_every: int = 25

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    # Seconds on 2 CPU cores: a demonstration of the whole pipeline, not a usable protection.
    "quick": {
        "bank": {"n_train": 192, "n_query": 64, "n_probe": 64, "sampler_steps": 15},
        "stage1_steps": 300, "stage1_lr": 5e-4, "stage1_warmup": 20, "stage2_steps": 60, "probe_every": 60,
        "probe_steps": 50,
        "attacks": {"inner_steps": [3, 8], "batch_sizes": [4, 16], "queries_per_attack": 2},
        "checkpoint_every": 50,
    },
    "full": {},
}


def _build(cls, values: dict, where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(names)
    if unknown:
        raise ValueError(f"unknown {where} setting(s): {', '.join(sorted(unknown))}")
    kwargs = {}
    for key, value in values.items():
        if key == "bank":
            kwargs[key] = _build(BankSettings, value, "bank")
        elif key == "attacks":
            kwargs[key] = _build(AttackSpace, {k: tuple(tuple(x) if isinstance(x, list) else x for x in v)
                                               if isinstance(v, list) else v for k, v in value.items()}, "attacks")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(preset: str = "full", path: str | Path | None = None) -> ProtectConfig:
    """A preset, optionally overridden by a .toml / .yaml / .json file."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                user = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                user = yaml.safe_load(text) or {}
            elif path.suffix == ".json":
                user = json.loads(text)
            else:
                raise ValueError(f"config file {path} must end in .toml, .yaml, .yml or .json")
        except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
            raise ValueError(f"config file {path} is not valid: {str(e).splitlines()[0]}") from e
        values = _merge(values, user)
    return _build(ProtectConfig, values, "protect")
