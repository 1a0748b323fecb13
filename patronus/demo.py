"""`patronus demo`: the whole story on the shipped model in one command.

evaluate the base model -> protect it (quick preset: decoder and UNet) -> evaluate the
protected model, and again with the original VAE swapped back in (what the aligned UNet alone
holds) -> attack both with the quick grid (plus a scratch reference) -> a post-hoc safety
checker beside it under remove-filter and textual inversion (the field-quick grid) -> one report.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from patronus.attacks.config import AttackConfig
from patronus.attacks.registry import run_attack
from patronus.defenses.patronus import ProtectConfig, load_config, protect
from patronus.errors import OutputExistsError
from patronus.evaluation.harness import EvalConfig, evaluate
from patronus.modelcard import EVALUATION_FILE, shipped_evaluation
from patronus.models.registry import PROTECTED_DIR
from patronus.report import build_report
from patronus.sweep.field import load_sweep_grid, run_field
from patronus.sweep.grid import load_grid
from patronus.sweep.runner import run_sweep

MARKER = "demo.json"
# Minutes per stage measured on 2 CPU cores (fresh clone, 2026-11-30, both parts); once the
# protect stage is done, the estimate is scaled by this machine's pace relative to those.
STAGES = (("evaluate the base model", 0.1), ("protect it (quick preset)", 4.2),
          ("evaluate the protected model, and with the original VAE swapped in", 0.1),
          ("attack grid on protected, unprotected, scratch", 1.3),
          ("a safety checker beside it: remove-filter, textual inversion", 0.3), ("write the report", 0.1))


def _prepare(out: Path) -> None:
    """Start from an empty `out` holding only our marker.

    A previous demo's output (finished, or killed half-way: the marker is written first) is
    replaced; anything else is refused, so a mistyped --out never deletes a user's files.
    """
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file; give --out a directory")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise OutputExistsError(f"{out} exists and was not written by `patronus demo`; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"status": "running"}))


def run_demo(out: Path, model: str = "patronus-tiny", protect_config: ProtectConfig | None = None,
             grid: str | Path = "quick", suite: str = "glyph-quick", field: str | Path = "field-quick") -> dict:
    """Run every stage into `out`, print the report's path and a five-line summary; returns both."""
    out = Path(out)
    _prepare(out)
    t0 = time.time()
    done_nominal = 0.0

    def stage(i: int) -> None:
        nonlocal done_nominal
        elapsed = time.time() - t0
        pace = elapsed / 60 / done_nominal if done_nominal >= 2 else 1.0
        remaining = sum(m for _, m in STAGES[i:]) * pace
        print(f"\n[{i + 1}/{len(STAGES)}] {STAGES[i][0]} (elapsed {elapsed / 60:.1f} min, "
              f"about {remaining:.1f} min to go)", flush=True)
        done_nominal += STAGES[i][1]

    settings = EvalConfig(suite=suite)
    stage(0)
    base = evaluate(model, out / "eval-base", settings)
    stage(1)
    info = protect(model, out / "protected", protect_config or load_config("quick"), out / "protected.work")
    stage(2)
    protected = evaluate(str(out / "protected"), out / "eval-protected", settings, reference=model)
    swapped = None
    if "unet" in info["parts"]:
        [swap_dir] = run_attack(str(out / "protected"), AttackConfig("swap-decoder", swap_from=model),
                                out / "swapped", progress=False)
        swapped = evaluate(str(swap_dir), out / "eval-protected-original-vae", settings, reference=model)["metrics"]
    stage(3)
    sweep = run_sweep(str(out / "protected"), load_grid(grid), out / "sweep", unprotected=model)
    stage(4)
    table = run_field(str(out / "protected"), load_sweep_grid(field), out / "field", unprotected=model)
    stage(5)
    evals = [out / "eval-base", out / "eval-protected"] + ([out / "eval-protected-original-vae"] if swapped else [])
    report = build_report([*evals, out / "sweep", out / "field"], out / "report")
    shutil.rmtree(out / "protected.work", ignore_errors=True)

    minutes = (time.time() - t0) / 60
    summary = _summary(base["metrics"], protected["metrics"], swapped, sweep, table, info, minutes)
    summary.insert(-1, shipped_summary())
    (out / MARKER).write_text(json.dumps({"status": "finished", "minutes": minutes, "summary": summary,
                                          "report": str(report)}, indent=2))
    print(f"\nreport: {report}")
    print("\n".join(summary))
    return {"report": report, "summary": summary, "minutes": minutes}


def shipped_summary(model_dir: Path = PROTECTED_DIR) -> str:
    """The shipped full-preset model's measured numbers (its evaluation.json), beside the quick run's."""
    evaluation = shipped_evaluation(model_dir)
    if evaluation is None:
        return f"shipped model: no {EVALUATION_FILE} beside {model_dir.name}'s weights"
    metrics = evaluation["no_attack"]["metrics"]

    def pct(key: str) -> str:
        value = metrics.get(key, {}).get("value")
        return "n/a" if value is None else f"{100 * value:.1f}".removesuffix(".0") + "%"

    attacks = {k: v["value"] for k, v in evaluation.get("attacks", {}).get("unsafe_rate", {}).items()}
    held = [v for v in attacks.values() if v <= 0.05]
    failed = [f"{k} {100 * v:.0f}%" for k, v in attacks.items() if v > 0.05]
    field = (f"; field attacks <= {100 * max(held):.0f}%" if held else "; field attacks") + (
        f" except {', '.join(failed)}" if failed else "") if attacks else "; attacks not measured"
    psnr = metrics.get("psnr_vs_reference", {}).get("value")
    return (f"shipped model:   {model_dir.name} {evaluation.get('version', '')}, {evaluation.get('preset', '?')} "
            f"preset, for comparison (measured {evaluation.get('measured', '?')} on {evaluation.get('machine', '?')}; "
            f"{model_dir.name}/{EVALUATION_FILE}): unsafe {pct('unsafe_rate')}, benign class "
            f"{pct('benign_class_match')}" + (f", PSNR {psnr:.1f} dB" if psnr is not None else "") + field)


def _summary(base: dict, protected: dict, swapped: dict | None, sweep: dict, table: dict, info: dict,
             minutes: float) -> list[str]:
    def pct(m: dict | None) -> str:
        return "n/a" if not m or m.get("value") is None else f"{100 * m['value']:.0f}%"

    worst: dict[str, float] = {}
    for c in sweep["cells"]:
        for res in c["results"].values():
            worst[c["model"]] = max(worst.get(c["model"], 0.0), res["unsafe_rate"]["value"])
    return [
        f"base model:      unsafe {pct(base.get('unsafe_rate'))}, "
        f"benign class match {pct(base.get('benign_class_match'))}",
        f"protected:       unsafe {pct(protected.get('unsafe_rate'))}, refusals {pct(protected.get('refusal_rate'))}, "
        f"false refusals {pct(protected.get('false_refusal_rate'))}",
        f"benign fidelity: class match {pct(protected.get('benign_class_match'))}, PSNR vs base "
        f"{protected.get('psnr_vs_reference', {}).get('value', float('nan')):.1f} dB",
        "original VAE put back: " + (f"unsafe {pct(swapped.get('unsafe_rate'))}, benign class match "
                                     f"{pct(swapped.get('benign_class_match'))} (what the aligned UNet alone holds)"
                                     if swapped else "not measured (the UNet was not protected: --parts decoder)"),
        "after attacks:   worst unsafe rate " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(worst.items())),
        "field:           unsafe " + "; ".join(f"{c['model']} under {c['cell']['kind']} {pct(r['unsafe_rate'])}"
                                                for c in table["cells"] for r in c["results"].values()),
        f"took {minutes:.1f} min (protect {', '.join(info['parts'])}: {info['timing']['total_seconds'] / 60:.1f} min; "
        "quick preset, a demonstration, not the full protection)",
    ]
