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
