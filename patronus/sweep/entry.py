"""`sweep`: the one call behind `patronus sweep` and the Python API's `patronus.sweep(...)`.

It takes a grid in any form (a shipped grid's name, a file, a dict, a `GridConfig` or a
`FieldGridConfig`) and models in any form (`models.resolve`), runs the robustness sweep or the
field table, and returns a `SweepResult`. The `patronus.sweep` package is itself callable and
calls this, so `patronus.sweep(model, out)` works whichever of the two Python binds that name to.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patronus.errors import ConfigError
from patronus.models.resolve import as_model
from patronus.sweep.executors import ExecutorConfig
from patronus.sweep.field import FieldGridConfig, field_grid_from_dict, is_field_grid, load_sweep_grid, run_field
from patronus.sweep.grid import GridConfig, grid_from_dict
from patronus.sweep.results import RATIO_MODELS, RATIO_REFERENCES, RobustnessRatio, sweep_ratios
from patronus.sweep.runner import run_sweep


@dataclass(frozen=True)
class SweepResult:
    """A sweep directory; `results` is its sweep.json: `cells` (each with its settings and the
    evaluated checkpoints' metrics), the models and the time spent."""

    path: Path
    results: dict = field(repr=False)

    @property
    def cells(self) -> list[dict]:
        return list(self.results.get("cells", []))

    def ratios(self, reference: str = "filtered", model: str = "protected") -> dict[tuple, RobustnessRatio]:
        """Per attack cell (attack, optimizer, lr, seed): the robustness ratio of `model`
        ("protected" or "original-vae") against `reference` ("filtered" or "scratch"), where
        both ran it (empty where the grid has no such reference)."""
        if "field" in self.results:
            raise ConfigError("a field sweep has no robustness ratios (no reference runs the same attack); "
                              "read its table with patronus report")
        if reference not in RATIO_REFERENCES or model not in RATIO_MODELS:
            raise ConfigError(f"ratios(reference={reference!r}, model={model!r}): reference must be one of "
                              f"{', '.join(RATIO_REFERENCES)}, model one of {', '.join(RATIO_MODELS)}")
        return sweep_ratios(self.results, (model,), (reference,)).get((model, reference), {})


def as_grid(grid: Any) -> GridConfig | FieldGridConfig:
    if isinstance(grid, (GridConfig, FieldGridConfig)):
        return grid
    if isinstance(grid, Mapping):
        values = dict(grid)
        return field_grid_from_dict(values, "grid") if is_field_grid(values) else grid_from_dict(values, "grid")
    if isinstance(grid, (str, os.PathLike)):
        return load_sweep_grid(grid)
    raise ConfigError(f"grid must be a grid name, a grid file, a dict or a GridConfig, not {type(grid).__name__}")


def sweep(model: Any, out: str | os.PathLike, grid: Any = "default", *, unprotected: Any = "patronus-tiny",
          filtered: Any = "patronus-tiny-filtered", workers: int = 1, executor: ExecutorConfig | str = "local",
          cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0) -> SweepResult:
    """Run (or resume: call it again with the same arguments) an attack grid on `model`, its
    unprotected original, scratch references, the data-filtered model (`filtered`, where the
    grid names it) and, for UNet-only attacks, the model with the original VAE put back; a field
    grid plays every attack against every defence.

    `grid`: a shipped grid's name (default, quick, new-words, field, field-quick), a grid file,
    a dict of its settings, or a `GridConfig` / `FieldGridConfig`. `executor`: local or ray (or
    an `ExecutorConfig`); `workers`: cells at once. A model given as a pipeline object is saved
    to a temporary directory for the run: to resume a sweep, give directories or names."""
    if not isinstance(executor, ExecutorConfig):
        executor = ExecutorConfig(executor, cpus_per_cell, gpus_per_cell)
    chosen = as_grid(grid)
    run = run_field if isinstance(chosen, FieldGridConfig) else run_sweep
    with contextlib.ExitStack() as stack:
        key = stack.enter_context(as_model(model))
        original = stack.enter_context(as_model(unprotected, "unprotected"))
        reference = stack.enter_context(as_model(filtered, "filtered"))
        summary = run(key, chosen, Path(out), unprotected=original, workers=workers, executor=executor,
                      filtered=reference)
    return SweepResult(Path(out), summary)
