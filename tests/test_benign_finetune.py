"""benchmarks/benign_finetune.py refuses an output folder that counted refusals by another rule
before it evaluates or fine-tunes anything: mixed rules would make its columns disagree."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "benign_finetune.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_an_out_folder_counted_by_another_rule_is_refused_before_any_work(tmp_path):
    step0 = tmp_path / "out" / "eval-protected-step-0"
    step0.mkdir(parents=True)
    (step0 / "metrics.json").write_text(json.dumps({"settings": {"refusal": "black"}, "metrics": {}}))
    result = _run("--model", "patronus-tiny-protected", "--base", "patronus-tiny", "--refusal", "rendered",
                  "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "counted refusals as 'black'" in result.stderr and "give another --out" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval-protected-step-0"]


def test_a_bad_refusal_rule_is_refused_before_any_work(tmp_path):
    result = _run("--model", "patronus-tiny-protected", "--refusal", "grey", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "--refusal" in result.stderr
    assert not (tmp_path / "out").exists()
