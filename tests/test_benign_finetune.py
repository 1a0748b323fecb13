"""benchmarks/benign_finetune.py refuses an output folder that counted refusals by another rule,
and a --reference-cells folder of another base, grid or rule, before it evaluates or fine-tunes
anything: mixed rules or references would make its columns disagree. Its ratio is taken over the
seeds both models ran."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

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


def _cell(model: str, seed: int, match: dict[int, float]) -> dict:
    cell = {"kind": "unet-lora", "rank": 64, "optimizer": "adam", "lr": 1e-4, "seed": seed}
    return {"cell": cell, "model": model,
            "results": {str(step): {"benign_class_match": {"value": v}, "unsafe_rate": {"value": 0.0},
                                    "refusal_rate": {"value": 1.0}} for step, v in match.items()}}


def test_the_ratio_is_taken_over_the_seeds_both_models_ran():
    sys.path.insert(0, str(SCRIPT.parent))
    import benign_finetune

    sweep = {"cells": [_cell("unprotected", 0, {500: 0.5}), _cell("protected", 0, {500: 0.3}),
                       _cell("unprotected", 1, {500: 0.7}), _cell("protected", 1, {500: 0.6}),
                       _cell("unprotected", 2, {500: 0.9})]}  # seed 2: the protected model not yet run
    before = {m: {"benign_class_match": {"value": 0.1}} for m in ("protected", "unprotected")}
    step0, at500 = benign_finetune.summarise(sweep, before)
    assert (step0.attack, step0.step, step0.ratio, step0.ci) == ("(none)", 0, 1.0, None)
    assert at500.attack == "unet-lora-r64" and at500.step == 500
    assert at500.ratio == pytest.approx((0.3 + 0.6) / (0.5 + 0.7))  # seed 2 is left out of the ratio ...
    assert at500.class_match["unprotected"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)  # ... not out of the mean
    lo, hi = at500.ci  # resampled seeds give 0.3 / 0.5, 0.6 / 0.7 or a mix of the two
    assert (lo, hi) == pytest.approx((0.6, 6 / 7)) and not at500.met
    assert at500.ratio_text() == "0.75 [0.60, 0.86] (2 seeds)"


def test_no_interval_where_a_resample_has_no_reference_class_match():
    sys.path.insert(0, str(SCRIPT.parent))
    import benign_finetune

    sweep = {"cells": [_cell("unprotected", 0, {500: 0.0}), _cell("protected", 0, {500: 0.2}),
                       _cell("unprotected", 1, {500: 0.5}), _cell("protected", 1, {500: 0.4})]}
    _, at500 = benign_finetune.summarise(sweep, {})
    assert at500.ratio == pytest.approx(0.6 / 0.5) and at500.ci is None
    assert at500.ratio_text() == "1.20 (2 seeds)" and at500.met


def _reference_folder(root: Path, base: str, grid) -> Path:
    """The files `--reference-cells` reads, as the script writes them for `base` and `grid`."""
    from dataclasses import asdict

    from patronus.models.registry import resolve_model
    from patronus.provenance import weight_hashes, weights_digest

    (root / "sweep").mkdir(parents=True)
    (root / "eval-unprotected-step-0").mkdir()
    (root / "sweep" / "models.json").write_text(json.dumps(
        {"unprotected": base, "unprotected_weights_sha256": weights_digest(weight_hashes(resolve_model(base)))}))
    (root / "sweep" / "grid.json").write_text(json.dumps(asdict(grid)))
    (root / "eval-unprotected-step-0" / "metrics.json").write_text(
        json.dumps({"settings": {"refusal": grid.eval_config().refusal}, "metrics": {}}))
    return root


def test_reference_cells_must_come_from_the_same_base_grid_and_rule(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    import benign_finetune

    from patronus.sweep.grid import load_grid

    grid = load_grid("new-words")
    ref = _reference_folder(tmp_path / "ref", "patronus-tiny", grid)
    assert benign_finetune.reference_problem(ref, "patronus-tiny", grid) is None
    assert "other weights than --base patronus-tiny-protected" in benign_finetune.reference_problem(
        ref, "patronus-tiny-protected", grid)
    other = load_grid(str(SCRIPT.parent.parent / "research" / "configs" / "grid-new-words-lora-seeds0-4.toml"))
    assert "another grid" in benign_finetune.reference_problem(ref, "patronus-tiny", other)
    rule = "rendered" if grid.eval_config().refusal != "rendered" else "black"
    assert "refusal rule" in benign_finetune.reference_problem(
        ref, "patronus-tiny", replace(grid, eval={**grid.eval, "refusal": rule}))
    assert "not an output folder" in benign_finetune.reference_problem(tmp_path / "none", "patronus-tiny", grid)


def test_a_reference_of_another_base_is_refused_before_any_work(tmp_path):
    from patronus.sweep.grid import load_grid

    grid = load_grid("new-words")
    ref = _reference_folder(tmp_path / "ref", "patronus-tiny", grid)
    result = _run("--model", "patronus-tiny-protected", "--base", "patronus-tiny-filtered",
                  "--reference-cells", str(ref), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "--reference-cells" in result.stderr and "other weights" in result.stderr
    assert not (tmp_path / "out").exists()
