"""`check_replicas_agree` stops a multi-process run whose processes' weights drifted apart."""

import os
import subprocess

from tests.launch import accelerate

SCRIPT = """
import sys, torch
from accelerate import Accelerator
from patronus.training import check_replicas_agree
acc = Accelerator()
m = torch.nn.Linear(3, 2)
torch.nn.init.constant_(m.weight, 1.0)
torch.nn.init.constant_(m.bias, 1.0 + (acc.process_index if sys.argv[1] == "drift" else 0) * 1e-6)
try:
    check_replicas_agree(acc, m, "the test module")
    acc.print("agree")
finally:
    torch.distributed.destroy_process_group()
"""


def _run(tmp_path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "replicas.py"
    script.write_text(SCRIPT)
    return subprocess.run(accelerate() + [str(script), mode], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"})


def test_identical_replicas_pass_and_drifted_ones_stop_the_run(tmp_path):
    same = _run(tmp_path, "same")
    assert same.returncode == 0 and same.stdout.count("agree") == 1, same.stderr[-2000:]
    drift = _run(tmp_path, "drift")
    assert drift.returncode != 0 and "the test module's weights differ between processes" in drift.stderr

