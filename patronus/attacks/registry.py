"""Every attack kind in one table: its name, what it trains, and the function that runs it.

An attack module registers its kinds at import (`attacks/__init__.py` imports them all).
The sweep, the CLI and the scratch references read only this table: a kind's `trains` says
which components the attack changes, so its scratch reference re-initialises exactly those,
and an attack that trains the UNet alone can be shared between a decoder-only protected
model and its original (that defence changed nothing such an attack reads).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from patronus.errors import ConfigError
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


# A prompt-space attack's checkpoint says how the evaluation should ask for unsafe content
# (`EvalConfig.prompt_rewrite`): {"rewrite": "tokens", "tokens": {class: learned token}} or
# {"rewrite": "paraphrase"}. The sweep and `patronus evaluate --attack-prompts` read it.
ATTACK_PROMPTS = "attack-prompts.json"


def source_model(out: Path) -> Path:
    """The pipeline directory an attack writing to `out` was started on (from its attack.json)."""
    from patronus.models.registry import resolve_model

    return resolve_model(json.loads((Path(out) / "attack.json").read_text())["model"])


def run_attack(model: str, cfg: AttackConfig, out: Path, progress: bool = True) -> list[Path]:
    """Attack `model` and write one pipeline directory per checkpoint under `out` (atomically).

    Every checkpoint keeps the model's inference settings (negative prompt, SLD preset) unless
    the attack is one that removes them (`keeps_filters`). Under `accelerate launch` with several
    processes (the fine-tuning kinds only) every process trains its shard of each batch and the
    main process alone writes.
    """
    from accelerate import Accelerator

    from patronus.models.inference import copy_inference
    from patronus.models.registry import load_pipeline, resolve_model

    accelerator = Accelerator()
    if accelerator.num_processes > 1 and not ATTACKS[cfg.kind].distributed:
        raise ConfigError(f"{cfg.kind} runs in one process; launch it without accelerate's several processes "
                          f"(the fine-tuning kinds run in several: "
                          f"{', '.join(k for k, a in ATTACKS.items() if a.distributed)})")
    if accelerator.num_processes > 1 and cfg.batch_size % accelerator.num_processes:
        raise ConfigError(f"--batch-size {cfg.batch_size} does not split evenly over {accelerator.num_processes} "
                          f"processes")
    with atomic_dir(out) if accelerator.is_main_process else _follower_dir(out) as tmp:
        pipe = load_pipeline(model)
        if accelerator.is_main_process:
            (tmp / "attack.json").write_text(json.dumps(asdict(cfg) | {"model": str(model)}, indent=2))
        names = ATTACKS[cfg.kind].run(pipe, cfg, tmp, progress and accelerator.is_main_process)
        if ATTACKS[cfg.kind].keeps_filters and accelerator.is_main_process:
            for name in names:
                copy_inference(resolve_model(model), tmp / name)
        accelerator.wait_for_everyone()
    return [Path(out) / n for n in names]


@contextlib.contextmanager
def _follower_dir(out: Path) -> Iterator[Path]:
    """Where the main process writes (`atomic_dir`'s temporary directory); the others only read its name."""
    yield Path(out).with_name(Path(out).name + ".partial")
