"""Sweeps as Ray tasks: the same cells, done.json files and metrics as the local pool."""

import json

import pytest
import torch

from patronus.sweep.executors import ExecutorConfig
from patronus.sweep.grid import GridConfig
from patronus.sweep.runner import run_sweep

pytest.importorskip("ray")

GRID = GridConfig(kinds=("unet-lora",), ranks=(2,), optimizers=("adam",), lrs=(1e-3,), budgets=(1, 2), batch_size=4,
                  suite="glyph-quick", references=("unprotected",), eval={"steps": 2, "batch_size": 36})


def _results(summary: dict) -> dict:
    return {(c["model"], json.dumps(c["cell"], sort_keys=True)): c["results"] for c in summary["cells"]}


def test_ray_executor_gives_the_local_pools_results(mini_pipeline, tmp_path):
    # Each Ray task holds one CPU and gives torch one thread; the local run uses one too, so the
    # two compute bitwise the same (a different thread count changes float summation order).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run_sweep(str(mini_pipeline), GRID, tmp_path / "local", unprotected=str(mini_pipeline))
    finally:
        torch.set_num_threads(threads)
    ray = run_sweep(str(mini_pipeline), GRID, tmp_path / "ray", unprotected=str(mini_pipeline), workers=2,
                    executor=ExecutorConfig("ray", cpus_per_cell=1))
    assert len(ray["cells"]) == len(local["cells"]) == 2
    assert _results(ray) == _results(local)
    # Each cell ran in a Ray worker: its progress went to the cell's log, not the driver's terminal.
    assert all((p.parent / "log.txt").exists() for p in (tmp_path / "ray" / "cells").glob("*/*/done.json"))
    # Resuming with the local pool finds every cell done.
    again = run_sweep(str(mini_pipeline), GRID, tmp_path / "ray", unprotected=str(mini_pipeline))
    assert _results(again) == _results(ray)
