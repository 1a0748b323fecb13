"""What a sweep runs: `GridConfig`, read from a grid file or one shipped in patronus/grids.

A grid names attack kinds, LoRA ranks, optimizers, learning-rate schedules, learning rates,
budgets (checkpoint steps) and seeds; the sweep runs their product on the protected model and its
references.
Everything a sweep would trip over only after hours of attacks is checked on construction.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from patronus.attacks.config import AttackConfig
from patronus.attacks.registry import ATTACKS
from patronus.config import read_config_file
from patronus.errors import ConfigError
from patronus.evaluation.harness import EvalConfig, resolve_prompts

GRIDS_DIR = Path(__file__).resolve().parent.parent / "grids"
# "original-vae" applies to the UNet-only kinds (as `ranks` to the LoRA kinds); other kinds skip it.
# "filtered" is the same attack on the data-filtered model (`run_sweep(filtered=...)`).
REFERENCES = ("unprotected", "scratch", "original-vae", "filtered")

# The type every grid setting must have: lists of these (`list`) or a single one.
_LIST_TYPES: dict[str, tuple[type, ...]] = {"kinds": (str,), "ranks": (int,), "optimizers": (str,),
                                            "schedules": (str,), "lrs": (int, float), "budgets": (int,),
                                            "seeds": (int,), "references": (str,)}
_SCALAR_TYPES: dict[str, tuple[type, ...]] = {"batch_size": (int,), "data": (str,), "suite": (str,),
                                              "keep_checkpoints": (bool,), "freeze_text_encoder": (bool,),
                                              "max_grad_norm": (int, float, type(None)), "eval": (dict,)}
# Settings that came after sweeps existed: a sweep's grid.json without them ran with these values,
# so it resumes under a grid that leaves them at their defaults (`with_added_settings`).
ADDED_SETTINGS: dict[str, object] = {"schedules": ["constant"], "freeze_text_encoder": False, "max_grad_norm": None}


@dataclass(frozen=True)
class GridConfig:
    kinds: tuple[str, ...] = ("unet-full", "unet-lora", "decoder-full", "joint")
    ranks: tuple[int, ...] = (4, 64)  # expands every LoRA kind
    optimizers: tuple[str, ...] = ("adam", "sgd")
    schedules: tuple[str, ...] = ("constant",)  # learning-rate schedules ("constant", "step"); expands like optimizers
    lrs: tuple[float, ...] = (1e-5, 1e-4, 1e-3)
    budgets: tuple[int, ...] = (100, 500, 2000)
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 16
    data: str = "attacker"
    suite: str = "glyph"
    references: tuple[str, ...] = REFERENCES
    keep_checkpoints: bool = False
    freeze_text_encoder: bool = False  # the kinds that train the text encoder (joint) train the UNet and decoder only
    max_grad_norm: float | None = None  # the fine-tuning kinds clip each step's gradient norm (diffusers' scripts: 1.0)
    eval: dict = field(default_factory=dict)  # extra EvalConfig fields (steps, guidance, ...)

    def __post_init__(self):
        for name in _LIST_TYPES:
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in (*_LIST_TYPES, *_SCALAR_TYPES):
            _check_type(name, getattr(self, name))
        if self.freeze_text_encoder and not any(k in ATTACKS and "text_encoder" in ATTACKS[k].trains
                                                for k in self.kinds):
            raise ConfigError(f"freeze_text_encoder applies to the kinds that train the text encoder "
                              f"({', '.join(k for k, a in ATTACKS.items() if 'text_encoder' in a.trains)}); "
                              f"this grid has none of them")
        if self.max_grad_norm is not None and not any(k in ATTACKS and ATTACKS[k].trains for k in self.kinds):
            raise ConfigError(f"max_grad_norm clips the kinds that fine-tune weights; this grid has none of them "
                              f"({', '.join(self.kinds)})")
        for cell in self.cells():
            attack_config(self, cell)  # raises on a bad kind, optimizer, schedule, rank or budget
        if unknown := set(self.references) - set(REFERENCES):
            raise ConfigError(f"unknown reference(s) {', '.join(sorted(unknown))}; choose from {', '.join(REFERENCES)}")
        allowed = [f for f in EvalConfig.__dataclass_fields__ if f != "suite"]  # the suite is a grid setting
        if unknown := set(self.eval) - set(allowed):
            raise ConfigError(f"unknown eval setting(s) {', '.join(sorted(unknown))}; choose from {', '.join(allowed)}")
        resolve_prompts(self.eval_config())

    def cells(self) -> list[dict]:
        def lora(kind: str) -> bool:  # an unknown kind is refused by its AttackConfig
            return kind in ATTACKS and ATTACKS[kind].lora

        def frozen_text(kind: str) -> bool:
            return self.freeze_text_encoder and kind in ATTACKS and "text_encoder" in ATTACKS[kind].trains

        def clipped(kind: str) -> bool:  # the one-shot and prompt-space kinds train no weights
            return self.max_grad_norm is not None and kind in ATTACKS and bool(ATTACKS[kind].trains)

        # "schedule", "freeze_text_encoder" and "max_grad_norm" only where they differ from the
        # defaults, so that the cells (ids, done.json) of a grid without them are those of sweeps
        # made before them.
        kinds = [(k, r) for k in self.kinds for r in (self.ranks if lora(k) else (None,))]
        return [{"kind": k, "rank": r, "optimizer": o, "lr": lr, "seed": s}
                | ({"schedule": sch} if sch != "constant" else {})
                | ({"freeze_text_encoder": True} if frozen_text(k) else {})
                | ({"max_grad_norm": self.max_grad_norm} if clipped(k) else {})
                for (k, r), o, sch, lr, s in itertools.product(kinds, self.optimizers, self.schedules, self.lrs,
                                                                self.seeds)]

    def eval_config(self) -> EvalConfig:
        return EvalConfig(suite=self.suite, **self.eval)


def _check_type(name: str, value: object) -> None:
    def ok(v: object, types: tuple[type, ...]) -> bool:
        return isinstance(v, types) and (bool in types or not isinstance(v, bool))

    if name in _LIST_TYPES:
        types = _LIST_TYPES[name]
        may_be_empty = name == "references"  # the protected model alone, e.g. beside another sweep's references
        if not isinstance(value, tuple) or not (value or may_be_empty) or not all(ok(v, types) for v in value):
            hint = " (YAML reads 1e-5 as text: write 1.0e-5)" if name == "lrs" else ""
            raise ConfigError(f"grid setting {name} = {value!r} must be a {'' if may_be_empty else 'non-empty '}"
                              f"list of {' or '.join(t.__name__ for t in types)}{hint}")
    elif not ok(value, _SCALAR_TYPES[name]):
        kinds = " or ".join(t.__name__ for t in _SCALAR_TYPES[name] if t is not type(None))
        raise ConfigError(f"grid setting {name} = {value!r} must be of type {kinds}")


def attack_config(grid: GridConfig, cell: dict) -> AttackConfig:
    return AttackConfig(kind=cell["kind"], data=grid.data, optimizer=cell["optimizer"], lr=cell["lr"],
                        schedule=cell.get("schedule", "constant"), steps=max(grid.budgets), rank=cell["rank"] or 8,
                        batch_size=grid.batch_size, save_at=tuple(grid.budgets), seed=cell["seed"],
                        freeze_text_encoder=cell.get("freeze_text_encoder", False),
                        max_grad_norm=cell.get("max_grad_norm"))


def with_added_settings(saved: dict) -> dict:
    """A sweep's saved grid.json with the settings added since (`ADDED_SETTINGS`) at the values it ran with."""
    return ADDED_SETTINGS | saved


def grid_path(path: str | Path) -> Path:
    """A grid file, or the file of a grid shipped in patronus/grids (`default`, `quick`, `paper`, `field`, ...)."""
    path = Path(path)
    if not path.exists() and (GRIDS_DIR / f"{path}.toml").exists():
        path = GRIDS_DIR / f"{path}.toml"
    if not path.is_file():
        raise ConfigError(f"grid file {path} not found (shipped grids: "
                          f"{', '.join(sorted(p.stem for p in GRIDS_DIR.glob('*.toml')))})")
    return path


def load_grid(path: str | Path) -> GridConfig:
    """A robustness grid: a file, or the name of a shipped one."""
    path = grid_path(path)
    return grid_from_dict(read_config_file(path, "grid"), path)


def grid_from_dict(values: dict, source: str | Path) -> GridConfig:
    """A checked grid from the settings of a grid file or of a sweep's `grid.json`."""
    if unknown := set(values) - set(GridConfig.__dataclass_fields__):
        raise ConfigError(f"unknown grid setting(s) in {source}: {', '.join(sorted(unknown))}")
    try:
        return GridConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e
