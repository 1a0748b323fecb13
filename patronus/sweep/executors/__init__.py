"""How sweep cells run. An executor takes `CellJob`s and returns futures of their done.json content.

`local` runs them in this process (one worker) or in spawned worker processes. A cluster
executor (e.g. Ray) implements the same two methods and joins `make_executor`.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

from patronus.sweep.cell import CellJob
from patronus.sweep.executors.local import LocalExecutor


class Executor(Protocol):
    slots: int  # how many cells may run at once

    def submit(self, job: CellJob) -> Future:
        """Start the cell; the future holds what `run_cell` returned (or its exception)."""

    def shutdown(self) -> None:
        """Stop workers and cancel cells not yet started."""


def make_executor(workers: int) -> Executor:
    return LocalExecutor(workers)
