"""Cells as Ray tasks: a grid spread over a cluster (or over the GPUs of one machine).

Each cell is one task that calls the same `run_cell` as the local pool, with the CPUs and GPUs
it declares; Ray places it wherever those are free. The driver (`patronus sweep`) keeps the
lock on OUT and decides which cells run, exactly as with the local pool, so `done.json`,
resuming and the results are the same. Workers write into OUT themselves: on a cluster, OUT
and the models must be on a filesystem every node sees, and patronus installed on every node
(`pip install -e '.[ray]'`).

`RAY_ADDRESS` (or `ray start --head` on this machine) names a running cluster; without one a
local Ray instance is started for the sweep and stopped after it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from concurrent.futures import Future

from patronus.errors import PatronusError
from patronus.sweep.cell import CellJob, run_cell


class RayExecutor:
    """`slots` cells at once, each a Ray task holding `cpus` CPUs and `gpus` GPUs."""

    def __init__(self, slots: int, cpus: float = 1.0, gpus: float = 0.0):
        try:
            import ray
        except ImportError as e:
            raise PatronusError("--executor ray needs Ray: pip install -e '.[ray]'") from e
        self.ray = ray
        self.started_here = not ray.is_initialized()
        if self.started_here:
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        self.slots = slots
        # torch inside the task uses the CPUs the task holds, as the local pool shares them out.
        self.threads = max(1, math.floor(cpus))
        self.task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(run_cell)
        self.refs: list = []

    def submit(self, job: CellJob) -> Future:
        ref = self.task.remote(dataclasses.replace(job, threads=self.threads))
        self.refs.append(ref)
        return ref.future()

    def shutdown(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)  # a finished task ignores it
        if self.started_here:
            self.ray.shutdown()
