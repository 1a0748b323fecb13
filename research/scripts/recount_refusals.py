"""Unsafe rates of a sweep's cells with the model's own refusals not counted as unsafe.

A UNet that refuses with a plain grey latent on patronus-tiny-filtered's VAE draws a framed grey
square that GlyphNet reads as a gun: the harness counts each such refusal as unsafe. This recounts
every cell's unsafe images (records.jsonl and images of each evaluation) leaving out those that are
refusals under a rule of `patronus evaluate --refusal` (the same thresholds), and prints, per
attack and budget, the share left over the attack seeds (mean [95% t interval]) beside the
harness's own figure.

    python research/scripts/recount_refusals.py runs/dgj5-er-plain-gamma10-long-grey \\
        --model runs/unet-full-er-plain-gamma10-long-grey-filtered --refusal rendered --refusal-rgb 150,150,150
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from patronus.evaluation.harness import REFUSALS, EvalConfig, refusal_reference
from patronus.evaluation.metrics import is_refusal
from patronus.models.registry import load_pipeline
from patronus.sweep.results import over_seeds


def recount(evaluation: Path, reference: np.ndarray | None) -> tuple[float, float]:
    """(harness unsafe rate, unsafe rate with refusals left out) of one evaluation's unsafe prompts."""
    records = [json.loads(line) for line in (evaluation / "records.jsonl").read_text().splitlines()]
    unsafe = [r for r in records if r["kind"] == "unsafe"]
    images = np.stack([np.asarray(Image.open(evaluation / r["image"]).convert("RGB")) for r in unsafe])
    refused = is_refusal(images, reference)
    flagged = np.array([r["detector"]["unsafe"] for r in unsafe])
    return float(flagged.mean()), float((flagged & ~refused).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="a `patronus sweep` output folder")
    p.add_argument("--model", required=True, help="the swept model (its VAE renders the `rendered` reference)")
    p.add_argument("--refusal", default="rendered", choices=REFUSALS)
    p.add_argument("--refusal-rgb", default="0,0,0", help="R,G,B as for patronus evaluate")
    p.add_argument("--column", default="protected", help="which of the sweep's models to recount")
    args = p.parse_args()
    cells = Path(args.sweep) / "cells" / args.column
    if not cells.is_dir():
        raise SystemExit(f"error: {cells} is not a folder; give a sweep folder and one of its columns")
    rgb = tuple(int(c) for c in args.refusal_rgb.split(","))
    settings = EvalConfig(refusal=args.refusal, refusal_rgb=rgb)
    pipe = load_pipeline(args.model)
    reference = refusal_reference(pipe, pipe.vae.config.sample_size, settings)
    table: dict[tuple[str, int], dict[int, dict]] = {}
    for evaluation in sorted(m.parent for m in cells.glob("*_s*/eval-step-*/metrics.json")):  # finished ones
        attack, seed = evaluation.parent.name.rsplit("_s", 1)
        step = int(evaluation.name.removeprefix("eval-step-"))
        harness, left = recount(evaluation, reference)
        table.setdefault((attack, step), {})[int(seed)] = {
            str(step): {"harness": {"value": harness, "ci": [harness, harness]},
                        "left": {"value": left, "ci": [left, left]}}}
    print(f"| attack | steps | seeds | unsafe (harness) | unsafe, {args.refusal} refusals left out |")
    print("|---|---|---|---|---|")
    for (attack, step), by_seed in sorted(table.items()):
        harness, left = over_seeds(by_seed, step, "harness"), over_seeds(by_seed, step, "left")
        print(f"| {attack} | {step} | {len(by_seed)} | {harness} | {left} |")


if __name__ == "__main__":
    main()
