"""`accelerate launch` with two CPU processes (gloo) trains the same base model as one process."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np

from tests.launch import accelerate
from tests.models.test_train_base import MINI


def _train(tmp_path, name: str, launcher: list[str], env: dict | None = None) -> dict:
    cfg = tmp_path / "mini.json"
    cfg.write_text(json.dumps(dataclasses.asdict(MINI)))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"} | (env or {})
    run = subprocess.run(launcher + ["-m", "patronus", "train-base", "--config", str(cfg),
                                     "--workdir", str(tmp_path / name)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("pipeline at") == 1  # one process reports
    return json.loads((tmp_path / name / "train_log.json").read_text())


def test_two_processes_and_one_agree_on_the_first_steps(tmp_path):
    one = _train(tmp_path, "one", [sys.executable])
    two = _train(tmp_path, "two", accelerate(), {"ACCELERATE_USE_CPU": "true"})
    for stage in ("vae", "unet"):
        assert one[stage]["processes"] == 1 and two[stage]["processes"] == 2
        a, b = one[stage]["loss_per_step"], two[stage]["loss_per_step"]
        assert len(a) == len(b) == 4
        # Each process trains half of every global batch with gradients averaged (DDP). Measured:
        # 1e-7 relative (float summation order); 7e-4 when the prepared LR schedule stepped
        # once per process.
        np.testing.assert_allclose(a, b, rtol=1e-5)
    assert (tmp_path / "two" / "pipeline" / "model_index.json").exists()
    assert not list((tmp_path / "two").glob("*.partial"))


def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path):
    cfg = tmp_path / "odd.json"
    cfg.write_text(json.dumps({"vae_batch": 7}))
    run = subprocess.run(accelerate() + ["-m", "patronus", "train-base", "--config", str(cfg), "--workdir",
                                       str(tmp_path / "w")], capture_output=True, text=True, timeout=600,
                         env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"})
    assert run.returncode != 0 and "must be multiples of the number of processes (2)" in run.stderr
    assert not (tmp_path / "w").exists()
