"""The memory features a real checkpoint needs change memory, not results: gradient
checkpointing recomputes the same activations; bf16 autocast (accelerate's mixed precision)
is live in every step."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from patronus.attacks.config import AttackConfig
from patronus.attacks.registry import run_attack


def _losses(out) -> list[float]:
    return json.loads((out / "losses.json").read_text())["loss_per_step"]


@pytest.mark.parametrize("kind", ["unet-full", "joint"])
def test_gradient_checkpointing_gives_the_same_losses(mini_pipeline, tmp_path, kind):
    runs = {}
    for name, memory in {"plain": {}, "checkpointing": {"gradient_checkpointing": True},
                         "slicing": {"vae_slicing": True}}.items():
        s = AttackConfig(kind=kind, lr=1e-3, steps=3, batch_size=4, save_at=(3,), **memory)
        run_attack(str(mini_pipeline), s, tmp_path / name, progress=False)
        runs[name] = _losses(tmp_path / name)
    assert runs["checkpointing"] == runs["plain"]  # recomputation in fp32 is deterministic: bit for bit
    # Encoding one image at a time instead of a batch changes float sums: 1e-7 relative at the
    # first step, 2e-5 by the third (Adam amplifies rounding).
    np.testing.assert_allclose(runs["slicing"], runs["plain"], rtol=2e-4)


def test_bf16_autocast_reaches_the_training_step(mini_pipeline, tmp_path):
    def attack(name: str, precision: str) -> list[float]:
        run = subprocess.run([sys.executable, "-m", "patronus", "attack", str(mini_pipeline), "--kind", "unet-full",
                              "--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--out", str(tmp_path / name)],
                             capture_output=True, text=True, timeout=300,
                             env=os.environ | {"ACCELERATE_MIXED_PRECISION": precision, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-2000:]
        return _losses(tmp_path / name)

    fp32, bf16 = attack("fp32", "no"), attack("bf16", "bf16")
    assert fp32 != bf16  # bf16 rounding shows: the forward ran under autocast
    np.testing.assert_allclose(fp32, bf16, rtol=0.05)  # and it is the same computation
