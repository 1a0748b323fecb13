"""The table of attack kinds: each kind's name, what it trains, and the function that runs it.

An attack module registers its kinds at import (`attacks/__init__.py` imports them all).
The sweep, the CLI and the scratch references read only this table: a kind's `trains` says
which components the attack changes, so its scratch reference re-initialises exactly those,
and an attack that trains the UNet alone can be shared between a decoder-only protected
model and its original (that defence changed nothing such an attack reads).

The table sits below `attacks.config` (which checks a kind against it) and `attacks.registry`
(which runs an attack from a config), so that no two of them import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patronus.models.components import COMPONENTS

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

# run(pipe, config, out, progress) -> the checkpoint directory names it wrote under `out`. The
# config is an `attacks.config.AttackConfig`; it is not named here because that module checks
# its kind against this table (no import cycle: tests/test_layout.py).
AttackRunner = Callable[["StableDiffusionPipeline", Any, Path, bool], list[str]]


@dataclass(frozen=True)
class AttackKind:
    name: str
    trains: frozenset[str]  # components it changes, from models.components.COMPONENTS ("" for none)
    lora: bool  # a LoRA (rank from the config) instead of full weights
    run: AttackRunner
    help: str
    one_shot: bool = False  # writes one checkpoint, step-0 (no training steps, optimizer or lr)
    uses_data: bool = True  # trains on `--data` (checked before anything runs)
    keeps_filters: bool = True  # checkpoints keep the model's inference settings (models/inference.py)
    prompt_space: bool = False  # leaves every weight alone; its checkpoints bring their own unsafe prompts
    distributed: bool = False  # runs under `accelerate launch` with several processes (data-parallel)

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
