"""Where everything lives in a sweep directory; the one place its paths are built.

    OUT/grid.json, models.json     the grid and models the sweep was started with
    OUT/sweep.json                 summary of every finished cell (written at the end of a run)
    OUT itself                     locked (flock) by the sweep running here
    OUT/references/scratch-KIND/   scratch models (the attacked components re-initialised)
    OUT/cells/MODEL/CELL/          one cell: done.json, log.txt, attack/step-N/, eval-step-N/
    OUT/defences/NAME/             a field grid's defended pipelines (built from the unprotected model)

Imports no torch, so that reports can read sweeps cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from patronus.errors import PatronusError

# In the order the runner queues them. "original-vae" is the protected model with the
# unprotected model's VAE put back, attacked by the UNet-only kinds: the UNet alone under attack.
# "filtered" is the model trained without unsafe content (`patronus-tiny-filtered`).
MODELS = ("unprotected", "protected", "original-vae", "scratch", "filtered")
# Attacks with no meaning on the data-filtered reference: swap-decoder puts the unprotected
# model's VAE back, which the filtered model never had (its own VAE is its original).
NOT_ON_REFERENCES = frozenset({"swap-decoder"})


class SweepError(PatronusError):
    """A sweep that cannot start as asked (bad settings, or an output dir of another grid)."""


# A cell is a dict: kind, rank (LoRA kinds, else None), optimizer and lr (None for one-shot kinds),
# seed, and only where they differ from the defaults, "schedule" (a learning-rate schedule other
# than "constant"), "freeze_text_encoder" (True: `joint` without the text encoder) and
# "max_grad_norm" (the gradient clipped to that norm). Cells, and so their ids and done.json
# files, of sweeps started before these existed stay as they were.


def schedule_of(cell: dict) -> str:
    return cell.get("schedule") or "constant"


def kind_name(cell: dict) -> str:
    """The attack kind, `joint-frozen-te` for joint without the text encoder (its own scratch reference too)."""
    return cell["kind"] + ("-frozen-te" if cell.get("freeze_text_encoder") else "")


def attack_name(cell: dict) -> str:
    """The attack kind with its LoRA rank, e.g. `unet-lora-r4` (`kind_name` for the kinds without one)."""
    return kind_name(cell) + (f"-r{cell['rank']}" if cell["rank"] else "")


def _training_extras(cell: dict) -> list[str]:
    """What a cell's training has beyond optimizer and rate: a schedule other than constant
    (`step`), gradient clipping (`clip1` for norm 1). Empty for the cells every old sweep had."""
    extras = [schedule_of(cell)] if schedule_of(cell) != "constant" else []
    if cell.get("max_grad_norm") is not None:
        extras.append(f"clip{cell['max_grad_norm']:g}")
    return extras


def optimizer_name(cell: dict) -> str | None:
    """The optimizer with its schedule and clipping where it has them, e.g. `sgd`, `sgd+step`, `adam+clip1`."""
    if cell["optimizer"] is None:
        return None
    return "+".join([cell["optimizer"], *_training_extras(cell)])


def cell_id(cell: dict) -> str:
    if cell["optimizer"] is None:  # a one-shot attack (no training): nothing but the kind to tell apart
        return f"{attack_name(cell)}_s{cell['seed']}"
    extras = "".join(f"_{x}" for x in _training_extras(cell))
    return f"{attack_name(cell)}_{cell['optimizer']}_lr{cell['lr']:g}{extras}_s{cell['seed']}"


def step_of(path: Path) -> int:
    """The step number of a `step-N` checkpoint or `eval-step-N` directory."""
    return int(path.name.rsplit("-", 1)[1])


@dataclass(frozen=True)
class CellLayout:
    """One cell's directory."""

    root: Path

    @property
    def attack(self) -> Path:
        return self.root / "attack"

    @property
    def done(self) -> Path:
        return self.root / "done.json"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    def eval(self, step: int) -> Path:
        return self.root / f"eval-step-{step}"


@dataclass(frozen=True)
class SweepLayout:
    root: Path

    @property
    def grid_file(self) -> Path:
        return self.root / "grid.json"

    @property
    def models_file(self) -> Path:
        return self.root / "models.json"

    @property
    def summary_file(self) -> Path:
        return self.root / "sweep.json"

    def scratch(self, kind: str) -> Path:
        """The scratch model of an attack kind (a `kind_name`: `joint-frozen-te` keeps the text encoder)."""
        return self.root / "references" / f"scratch-{kind}"

    def scratch_kinds(self) -> list[str]:
        """The attack kinds (`kind_name`s) that have a scratch reference (made before any of their cells runs)."""
        return sorted(p.name.removeprefix("scratch-") for p in (self.root / "references").glob("scratch-*"))

    def defence(self, name: str) -> Path:
        return self.root / "defences" / name

    def original_vae(self) -> Path:
        return self.root / "references" / "original-vae"

    def cell(self, model: str, cell: dict) -> CellLayout:
        return CellLayout(self.root / "cells" / model / cell_id(cell))

    def done_files(self) -> list[Path]:
        return sorted((self.root / "cells").glob("*/*/done.json"))

    def attack_dirs(self) -> list[Path]:
        return sorted((self.root / "cells").glob("*/*/attack"))

    def evaluations_with(self, filename: str) -> list[Path]:
        """Files named `filename` in every cell's evaluation directories."""
        return sorted((self.root / "cells").glob(f"*/*/eval-step-*/{filename}"))
