"""How sweep cells run. An executor takes `CellJob`s and returns futures of their done.json content.

`local` runs them in this process (one worker) or in spawned worker processes; `ray` runs
each as a Ray task with declared CPUs and GPUs, on a local Ray instance or a cluster
(`RAY_ADDRESS`). The runner decides which cells run and in what order; an executor only runs them.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from patronus.errors import ConfigError
from patronus.sweep.cell import CellJob
from patronus.sweep.executors.local import LocalExecutor

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    slots: int  # how many cells may run at once

    def submit(self, job: CellJob) -> Future:
        """Start the cell; the future holds what `run_cell` returned (or its exception)."""

    def shutdown(self) -> None:
        """Stop workers and cancel cells not yet started."""


@dataclass(frozen=True)
class ExecutorConfig:
    kind: str = "local"
    cpus_per_cell: float = 1.0  # ray: the CPUs a cell's task holds (torch gets that many threads)
    gpus_per_cell: float = 0.0  # ray: the GPUs it holds (1 on a multi-GPU box: one cell per GPU)

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise ConfigError(f"unknown executor {self.kind!r}; choose one of {', '.join(EXECUTORS)}")
        if not (math.isfinite(self.cpus_per_cell) and self.cpus_per_cell > 0
                and math.isfinite(self.gpus_per_cell) and self.gpus_per_cell >= 0):
            raise ConfigError(f"--cpus-per-cell must be > 0 and --gpus-per-cell >= 0, got {self.cpus_per_cell} "
                              f"and {self.gpus_per_cell}")


def make_executor(workers: int, cfg: ExecutorConfig = ExecutorConfig()) -> Executor:
    """`workers` cells at once, on this machine's process pool or as Ray tasks."""
    if cfg.kind == "ray":
        from patronus.sweep.executors.ray import RayExecutor

        return RayExecutor(workers, cfg.cpus_per_cell, cfg.gpus_per_cell)
    return LocalExecutor(workers)
