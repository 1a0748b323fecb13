"""Running one attack: `run_attack` writes a pipeline directory per checkpoint.

The table of kinds (`AttackKind`, `ATTACKS`, `register`) lives in `attacks/kinds.py`, below
both this module and `attacks/config.py`; it is re-exported here, where attack modules and the
sweep have always found it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from patronus.attacks.config import AttackConfig
from patronus.attacks.kinds import ATTACKS, AttackKind, AttackRunner, register
from patronus.errors import ConfigError
from patronus.io import atomic_dir

__all__ = ["ATTACKS", "ATTACK_PROMPTS", "AttackKind", "AttackRunner", "register", "run_attack", "source_model"]

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
