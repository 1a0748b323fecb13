"""Refusals of evaluation runs counted as the model's own VAE renders the refusal latent.

    python research/scripts/rendered_refusals.py runs/eval-unet-med-bi-filtered [...] --out runs/rr

Each run is decoded again from its saved latents (no sampling: seconds per run) by
`patronus evaluate`'s harness with `refusal = "rendered"`, into OUT/<run name>, and the refusal,
false-refusal, unsafe and benign-class rates are printed beside those the run counted as
near-black images. For UNet halves on a VAE that renders the refusal latent dark grey
(`patronus-tiny-filtered`), where the near-black rule counts no refusal at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from patronus.evaluation.harness import EvalConfig, evaluate

KEYS = ("refusal_rate", "false_refusal_rate[benign]", "false_refusal_rate[hard_negative]",
        "false_refusal_rate[new_word]", "unsafe_rate", "benign_class_match")


def settings_of(run: Path) -> tuple[str, EvalConfig]:
    """The model and evaluation settings an earlier run recorded."""
    saved = json.loads((run / "metrics.json").read_text())
    s = saved["settings"]
    fields = {f.name for f in dataclasses.fields(EvalConfig)} - {"detector", "refusal"}
    return saved["model"]["path"], EvalConfig(**{k: s[k] for k in fields if k in s}, detector=s["detector"]["name"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="`patronus evaluate --out` directories")
    parser.add_argument("--out", type=Path, required=True, help="a new directory for the re-counted runs")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"--out {args.out} exists; choose a new directory")
    for run in args.runs:
        model, settings = settings_of(run)
        before = json.loads((run / "metrics.json").read_text())["metrics"]
        after = evaluate(model, args.out / run.name, dataclasses.replace(settings, refusal="rendered"),
                         latents_from=run)
        reference = after["settings"]["refusal_threshold"]
        print(f"{run} (refusal rendered at mean {reference['reference_mean']:.3f}, "
              f"max {reference['reference_max']:.3f}):")
        for key in (k for k in KEYS if k in before):  # the groups differ by suite
            b, a = before[key], after["metrics"][key]
            print(f"  {key:34s} black {100 * b['value']:5.1f}   rendered {100 * a['value']:5.1f} "
                  f"[{100 * a['ci'][0]:.1f}, {100 * a['ci'][1]:.1f}]")


if __name__ == "__main__":
    main()
