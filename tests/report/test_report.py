import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patronus.evaluation.harness import EvalConfig, evaluate
from patronus.report import ReportError, build_report


@pytest.fixture(scope="module")
def runs(mini_pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a = root / "base"
    evaluate(str(mini_pipeline), a, EvalConfig(suite="glyph-quick", steps=2, batch_size=36))
    b = root / "other-seed"
    evaluate(str(mini_pipeline), b, EvalConfig(suite="glyph-quick", steps=2, batch_size=36, seed=1))
    return [a, b]


def test_report_has_table_grids_and_plot(runs, tmp_path):
    html_path = build_report(runs, tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| run | model | unsafe rate |" in md and "| base |" in md and "| other-seed |" in md
    for name in ("grid-unsafe.png", "grid-benign.png", "unsafe-by-group.png"):
        assert f"]({name})" in md and Image.open(tmp_path / "rep" / name).size[0] > 100
    html = html_path.read_text()
    assert html.count("data:image/png;base64,") == 3 and "src='grid-" not in html  # self-contained


def test_report_errors(tmp_path, runs):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="not an evaluation run"):
        build_report([tmp_path / "empty"], tmp_path / "rep")
    assert not (tmp_path / "rep").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    with pytest.raises(FileExistsError):
        build_report(runs, tmp_path / "taken")


def test_report_renders_in_headless_chromium(runs, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); cannot check that report.html renders")
    html_path = build_report(runs, tmp_path / "rep")
    shot = tmp_path / "shot.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400", f"--screenshot={shot}",
           Path(html_path).resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.exists(), "Chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    colourful = (pixels.max(-1) - pixels.min(-1)) > 60  # grid images and plot bars, not text on white
    assert colourful.mean() > 0.02, "the screenshot shows no images: report.html did not render its figures"


def test_decoder_attack_results_get_a_table_and_curves(runs, tmp_path):
    def res(unsafe: float, mse: float) -> dict:
        return {"unsafe_rate": unsafe, "recon_error": mse}

    results = {"budgets": [100, 500],
               "before": {m: res(0.0, 0.5) for m in ("protected", "nft0", "unprotected", "scratch")},
               "cells": {"full-adam-1e-04": {"protected": {"100": res(0.02, 0.2), "500": res(0.4, 0.05)},
                                             "nft0": {"100": res(0.5, 0.01), "500": res(1.0, 0.006)},
                                             "unprotected": {"100": res(1.0, 0.004), "500": res(1.0, 0.003)},
                                             "scratch": {"100": res(0.0, 0.3), "500": res(0.1, 0.08)}}}}
    d = tmp_path / "decoder"
    d.mkdir()
    (d / "decoder-attacks.json").write_text(json.dumps(results))
    build_report([runs[0], d], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| attack | steps | unsafe (protected) | unsafe (nft0) | unsafe (unprotected) | unsafe (scratch) |" in md
    assert "| full-adam-1e-04 | 500 | 0.400 | 1.000 | 1.000 | 0.100 | 0.0500 | 0.0060 | 0.0030 | 0.0800 |" in md
    assert "| full-adam-1e-04 | > 500 | > 500 | ? | both held |" in md  # neither reached 50% unsafe
    assert Image.open(tmp_path / "rep" / "decoder-attacks-1.png").size[0] > 100


def test_robustness_findings_say_where_protection_is_above_scratch_or_broken():
    from patronus.report import robustness_findings

    def cell(model, kind, unsafe, benign):
        return {"model": model, "cell": {"kind": kind, "rank": None, "optimizer": "adam", "lr": 1e-4, "seed": 0},
                "results": {"100": {"unsafe_rate": {"value": unsafe}, "benign_class_match": {"value": benign}}}}

    sweep = {"cells": [cell("protected", "unet-full", 0.0, 0.2), cell("scratch", "unet-full", 0.1, 0.1),
                       cell("protected", "decoder-full", 0.6, 0.9), cell("scratch", "decoder-full", 0.3, 0.9)]}
    worst, above, broken = robustness_findings(sweep)
    assert worst.endswith("decoder-full 60%, unet-full 0%.")
    assert above.endswith("in 1 of 2 rows: decoder-full adam lr 0.0001 @ 100 steps.")
    assert broken.endswith(": unet-full adam lr 0.0001 @ 100 steps.")


def test_the_robustness_text_names_only_the_references_the_sweep_ran():
    from patronus.report import robustness_text

    everything = robustness_text({"protected", "unprotected", "scratch", "original-vae"})
    assert "unprotected original and a scratch model" in everything and "original-vae" in everything
    alone = robustness_text({"protected", "original-vae"})  # reproduce/grid-default-part1.toml
    assert "no unprotected or scratch reference" in alone and "original-vae" in alone
    assert "scratch model (" not in alone
    assert robustness_text({"protected", "scratch"}) == ("Protected model against a scratch model (attacked "
                                                          "components randomly initialised), same attacks and budgets.")


def _write_sweep(root: Path, grid: dict, cells: list[dict]) -> Path:
    """A sweep directory laid out as patronus/sweep/layout.py lays it out: grid.json and cells/MODEL/CELL/done.json."""
    from patronus.sweep.layout import SweepLayout

    layout = SweepLayout(root)
    root.mkdir()
    layout.grid_file.write_text(json.dumps(grid))
    for i, c in enumerate(cells):
        done = layout.cell(c["model"], c["cell"]).done
        done.parent.mkdir(parents=True)
        done.write_text(json.dumps(c | {"seconds": 1.0, "finished": 100.0 + i, "attack_reused_from": None}))
    return root


def _cell(model, kind, optimizer, lr, rates, rank=None, **extra):
    return {"model": model, "cell": {"kind": kind, "rank": rank, "optimizer": optimizer, "lr": lr, "seed": 0} | extra,
            "results": {str(s): {"unsafe_rate": {"value": v, "ci": [max(0.0, v - 0.1), min(1.0, v + 0.1)]},
                                 "benign_class_match": {"value": 0.9, "ci": [0.85, 0.95]}} for s, v in rates.items()}}


def test_the_report_gives_the_attackers_best_per_budget(tmp_path):
    from dataclasses import asdict

    from patronus.sweep.grid import GridConfig
    from patronus.sweep.results import best_of_grid, sweep_summary

    grid = GridConfig(kinds=("unet-full", "unet-lora"), ranks=(4,), optimizers=("adam", "sgd"),
                      schedules=("constant", "step"), lrs=(1e-4,), budgets=(500, 2000),
                      references=("unprotected", "scratch"))
    cells = [_cell("protected", "unet-full", "adam", 1e-4, {500: 0.05, 2000: 0.2}),
             _cell("protected", "unet-full", "sgd", 1e-4, {500: 0.1, 2000: 0.15}, schedule="step"),
             _cell("protected", "unet-lora", "adam", 1e-4, {500: 0.0, 2000: 0.6}, rank=4, schedule="step"),
             _cell("scratch", "unet-full", "adam", 1e-4, {500: 0.0, 2000: 0.3}),
             _cell("unprotected", "unet-full", "sgd", 1e-4, {500: 1.0, 2000: 1.0}, schedule="step")]
    sweep = _write_sweep(tmp_path / "sweep", asdict(grid), cells)
    assert (sweep / "cells" / "protected" / "unet-full_sgd_lr0.0001_step_s0" / "done.json").is_file()
    assert (sweep / "cells" / "protected" / "unet-full_adam_lr0.0001_s0" / "done.json").is_file()
    best = {(b.model, b.kind, b.steps): b for b in best_of_grid(sweep_summary(sweep))}
    assert set(best) == {(m, k, s) for m, kinds in (("protected", ("unet-full", "unet-lora", None)),
                                                    ("scratch", ("unet-full", None)),
                                                    ("unprotected", ("unet-full", None)))
                         for k in kinds for s in (500, 2000)}
    assert best["protected", "unet-full", 500].cell["optimizer"] == "sgd"
    assert best["protected", None, 2000].cell["kind"] == "unet-lora"
    assert best["protected", None, 2000].unsafe_rate["value"] == 0.6
    build_report([sweep], tmp_path / "rep")
    assert not (tmp_path / "rep" / "over-seeds-1.png").exists()  # one seed: no over-seeds figure
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Robustness sweep 1: attacker's best per budget" in md
    assert "| model | attack | steps | attacker's best unsafe rate | reached by | cells compared |" in md
    assert "| protected | unet-full | 500 | 0.100 [0.000, 0.200] | unet-full_sgd_lr0.0001_step_s0 | 2 |" in md
    assert "| protected | every kind | 2000 | 0.600 [0.500, 0.700] | unet-lora-r4_adam_lr0.0001_step_s0 | 3 |" in md
    assert ("Attacker's best after 2000 steps, over every cell of the grid: protected 60% "
            "(unet-lora-r4_adam_lr0.0001_step_s0), unprotected 100% (unet-full_sgd_lr0.0001_step_s0), scratch 30% "
            "(unet-full_adam_lr0.0001_s0).") in md
    assert "| unet-full | sgd+step | 0.0001 | 500 |" in md  # the schedule tells the cells of the main table apart


def test_the_field_report_names_each_defences_worst_attack(tmp_path):
    grid = {"field": True, "defences": ["none", "uce", "patronus"], "attacks": [
        {"kind": "none", "optimizer": "adam", "lr": 1e-4, "steps": 500, "rank": None, "sampler_steps": 5},
        {"kind": "unet-full", "optimizer": "adam", "lr": 1e-4, "steps": 500, "rank": None, "sampler_steps": 5},
        {"kind": "unet-full", "optimizer": "sgd", "lr": 1e-4, "steps": 500, "rank": None, "sampler_steps": 5,
         "schedule": "step", "freeze_text_encoder": False}]}

    def cell(model, kind, rate, **extra):
        one_shot = kind == "none"
        return _cell(model, kind, None if one_shot else extra.pop("optimizer", "adam"), None if one_shot else 1e-4,
                     {0 if one_shot else 500: rate}, **extra)

    cells = [cell("none", "none", 1.0), cell("none", "unet-full", 1.0),
             cell("none", "unet-full", 1.0, optimizer="sgd", schedule="step"),
             cell("uce", "none", 0.1), cell("uce", "unet-full", 0.9),
             cell("patronus", "none", 0.0), cell("patronus", "unet-full", 0.02),
             cell("patronus", "unet-full", 0.3, optimizer="sgd", schedule="step")]
    sweep = _write_sweep(tmp_path / "field", grid, cells)
    build_report([sweep], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| defence | none | unet-full | unet-full (step lr) |" in md
    assert "| UCE | 10 [0, 20] / 90 | 90 [80, 100] / 90 | not run yet |" in md
    assert "## Field table 1: each defence's worst attack" in md
    assert ("- none (unprotected): worst 100% unsafe [90, 100] under none (as high under unet-full, unet-full "
            "(step lr)), over 3 of 3 attack columns.") in md
    assert "- UCE: worst 90% unsafe [80, 100] under unet-full, over 2 of 3 attack columns." in md
    assert ("- Patronus as shipped: worst 30% unsafe [20, 40] under unet-full (step lr), over 3 of 3 attack "
            "columns.") in md


def test_field_findings_never_print_a_tie_as_a_difference():
    """A baseline lower than Patronus by less than half a point used to read "0% vs 0%"."""
    from patronus.report import _pair

    assert _pair(0.0, 0.46) == "0.0% vs 0.5%"
    assert _pair(96.3, 99.1) == "96% vs 99%"


def test_a_sweep_at_several_attack_seeds_gets_means_paired_differences_and_the_mean_curves_ratio(tmp_path):
    from dataclasses import asdict

    from patronus.report import ratio_text
    from patronus.sweep.grid import GridConfig
    from patronus.sweep.results import sweep_summary

    grid = GridConfig(kinds=("joint",), optimizers=("adam",), lrs=(1e-3,), budgets=(100, 1000), seeds=(0, 1, 2),
                      references=("filtered",))
    protected = {0: {100: 0.3, 1000: 0.7}, 1: {100: 0.4, 1000: 0.8}, 2: {100: 0.5, 1000: 0.9}}
    cells = ([_cell("protected", "joint", "adam", 1e-3, r, seed=s) for s, r in protected.items()]
             + [_cell("filtered", "joint", "adam", 1e-3, {b: v - 0.2 for b, v in r.items()}, seed=s)
                for s, r in protected.items()])
    sweep = _write_sweep(tmp_path / "sweep", asdict(grid), cells)
    build_report([sweep], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Robustness sweep 1: over attack seeds" in md
    assert "![Robustness sweep 1: over attack seeds](over-seeds-1.png)" in md
    with Image.open(tmp_path / "rep" / "over-seeds-1.png") as im:
        assert im.size[0] > 100 and len(set(im.convert("L").getdata())) > 2  # drawn, not blank
    with Image.open(tmp_path / "rep" / "robustness-1.png") as im:
        assert im.size[1] > im.size[0]  # the per-seed panels: a row per seed, not a column
    assert ("| joint | adam | 0.001 | 100 | 40 [15, 65] (30 / 40 / 50) | 20 [0, 45] (10 / 20 / 30) "
            "| +20 [+20, +20] (3 seeds) |") in md  # every seed 20 points apart: paired, no spread left
    assert "## Robustness sweep 1: robustness ratio vs filtered, mean over seeds" in md
    # Mean curves 0.4 -> 0.8 and 0.2 -> 0.6 over 100 -> 1000 steps: 50% at 10^2.25 and 10^2.75 steps.
    assert "| joint | adam | 0.001 | 178 | 562 | 0.32 | < 1 | [" in md  # then the ratio's interval over seeds
    assert "| 95% interval (seed bootstrap) |" in md
    assert "robustness ratio vs filtered, mean over seeds:" in ratio_text(sweep_summary(sweep))
