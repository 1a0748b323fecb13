"""Cells in this process (one worker), or side by side in spawned one-job-at-a-time processes."""

from __future__ import annotations

import dataclasses
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor

import torch

from patronus.sweep.cell import CellJob, run_cell


class LocalExecutor:
    """`workers` > 1 shares this machine's torch threads out between that many processes."""

    def __init__(self, workers: int):
        self.slots = workers
        self.pool = None if workers == 1 else ProcessPoolExecutor(workers,
                                                                 mp_context=multiprocessing.get_context("spawn"))
        self.threads = None if workers == 1 else max(1, torch.get_num_threads() // workers)

    def submit(self, job: CellJob) -> Future:
        if self.pool is not None:
            return self.pool.submit(run_cell, dataclasses.replace(job, threads=self.threads))
        fut: Future = Future()
        fut.set_result(run_cell(job))  # an error propagates from here, with its traceback
        return fut

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
