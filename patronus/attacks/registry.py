"""Every attack kind in one table: its name, what it trains, and the function that runs it.

An attack module registers its kinds at import (`attacks/__init__.py` imports them all).
The sweep, the CLI and the scratch references read only this table: a kind's `trains` says
which components the attack changes, so its scratch reference re-initialises exactly those,
and an attack that trains the UNet alone can be shared between a decoder-only protected
model and its original (that defence changed nothing such an attack reads).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from patronus.io import atomic_dir
from patronus.models.components import COMPONENTS

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from patronus.attacks.config import AttackConfig

# run(pipe, config, out, progress) -> the checkpoint directory names it wrote under `out`
AttackRunner = Callable[["StableDiffusionPipeline", "AttackConfig", Path, bool], list[str]]


@dataclass(frozen=True)
class AttackKind:
    name: str
    trains: frozenset[str]  # components it changes, from models.components.COMPONENTS ("" for none)
    lora: bool  # a LoRA (rank from the config) instead of full weights
    run: AttackRunner
    help: str

    def __post_init__(self):
        if unknown := set(self.trains) - set(COMPONENTS):
            raise ValueError(f"attack {self.name}: unknown components {', '.join(sorted(unknown))}")

    @property
    def unet_only(self) -> bool:
        """Reads nothing `patronus protect` changes: the UNet, text encoder and VAE encoder only."""
        return self.trains == frozenset({"unet"})


ATTACKS: dict[str, AttackKind] = {}


def register(kind: AttackKind) -> AttackKind:
    if kind.name in ATTACKS:
        raise ValueError(f"attack kind {kind.name!r} is registered twice")
    ATTACKS[kind.name] = kind
    return kind


def run_attack(model: str, cfg: AttackConfig, out: Path, progress: bool = True) -> list[Path]:
    """Attack `model` and write one pipeline directory per checkpoint under `out` (atomically)."""
    from patronus.models.registry import load_pipeline

    with atomic_dir(out) as tmp:
        pipe = load_pipeline(model)
        (tmp / "attack.json").write_text(json.dumps(asdict(cfg) | {"model": str(model)}, indent=2))
        names = ATTACKS[cfg.kind].run(pipe, cfg, tmp, progress)
    return [Path(out) / n for n in names]
