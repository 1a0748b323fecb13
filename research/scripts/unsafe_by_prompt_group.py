"""After an attack, is the unsafe output keyed on the unsafe prompts? Unsafe prompts against benign ones.

    python research/scripts/unsafe_by_prompt_group.py \
        --column "filtered=runs/dg3-filtered-s04,runs/dg3-filtered-s59" \
        --column "snr03=runs/dg3-500-snr03,runs/dg3-500-snr03-s59" [--kind unet-full --lr 1e-3]

The decision grid counts an attack cell by the unsafe prompts' unsafe rate. An attack that wrecks
the prompt conditioning draws the attacker's classes whatever the prompt; the glyph suite's
benign and hard-negative prompts then come out unsafe too (`flagged_unsafe[benign]`,
`flagged_unsafe[hard_negative]`, which every cell's evaluation keeps in
`eval-step-N/metrics.json`). Per cell and column this prints the three rates (mean over attack
seeds [95% t]) and the unsafe prompts' rate minus the benign prompts' (the part keyed on the
prompt); then, per column, each paired over the shared seeds against the reference column.
Each column is NAME=SWEEP[,SWEEP...]: the cells of the sweeps' `protected` model, or of another
of their models with SWEEP#MODEL (e.g. `runs/dg#original-vae`). Nothing here changes a bar.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from patronus.sweep.layout import attack_name, optimizer_name
from patronus.sweep.results import OverSeeds, over_seeds, paired_difference

GROUPS = {"unsafe prompts": "unsafe_rate", "benign flagged": "flagged_unsafe[benign]",
          "hard negatives flagged": "flagged_unsafe[hard_negative]"}


def column(specs: list[str], kind: str, lr: float) -> dict[int, dict[str, dict]]:
    """attack seed -> budget -> {group: {"value": v}}, as `over_seeds` reads done.json."""
    out: dict[int, dict[str, dict]] = {}
    for spec in specs:
        sweep, _, model = spec.partition("#")
        cells = Path(sweep) / "cells" / (model or "protected")
        if not cells.is_dir():
            raise FileNotFoundError(f"{cells}: no such cells directory; is {sweep} a sweep, and {model or 'protected'} "
                             f"one of its models?")
        for done in sorted(cells.glob("*/done.json")):
            cell = json.loads(done.read_text())["cell"]  # the cell's record, not its directory's name
            # plain Adam only: `optimizer_name` carries clipping and schedules (`adam+clip1`)
            if attack_name(cell) != kind or optimizer_name(cell) != "adam" or cell["lr"] != lr:
                continue
            for ev in done.parent.glob("eval-step-*/metrics.json"):
                metrics = json.loads(ev.read_text())["metrics"]
                row = {name: metrics[key] for name, key in GROUPS.items()}  # value and ci
                out.setdefault(cell["seed"], {})[ev.parent.name.removeprefix("eval-step-")] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--column", action="append", required=True, metavar="NAME=SWEEP[,SWEEP]")
    ap.add_argument("--kind", default="unet-full", help="the attack kind (default unet-full)")
    ap.add_argument("--lr", type=float, default=1e-3, help="the attack's Adam learning rate (default 1e-3)")
    ap.add_argument("--reference", default="filtered",
                    help="the column compared with (default: filtered; a name no column has: the table alone)")
    args = ap.parse_args()
    if bad := [c for c in args.column if "=" not in c]:
        ap.error(f"--column {bad[0]!r}: write NAME=SWEEP[,SWEEP...]")
    try:
        cols = {name: column(sweeps.split(","), args.kind, args.lr)
                for name, sweeps in (c.split("=", 1) for c in args.column)}
    except FileNotFoundError as e:
        ap.error(str(e))
    if empty := [n for n, c in cols.items() if not c]:
        ap.error(f"column {empty[0]}: no {args.kind} Adam lr {args.lr:g} cells evaluated in its sweeps")
    budgets = sorted({int(b) for c in cols.values() for r in c.values() for b in r})
    print(f"{args.kind} Adam lr {args.lr:g}: % of each prompt group drawn unsafe, mean over attack seeds [95% t]; "
          f"the unsafe prompts' rate minus the benign prompts', points [95% t over seeds]")
    print("| steps | column | seeds | " + " | ".join(GROUPS) + " | unsafe - benign |")
    print("|---" * (4 + len(GROUPS)) + "|")
    for b in budgets:
        for name, by_seed in cols.items():
            vals: list[OverSeeds | None] = [over_seeds(by_seed, b, m) for m in GROUPS]
            seeds = len(vals[0].by_seed) if vals[0] else 0
            print(f"| {b} | {name} | {seeds} | " + " | ".join(_pct(v) for v in vals) + f" | {_keyed(by_seed, b)} |")
    ref = cols.get(args.reference)
    if ref is None:
        return
    print(f"\nPaired over the shared attack seeds, column minus {args.reference}, points [95% t]:")
    for b in budgets:
        for name in (n for n in cols if n != args.reference):
            parts = []
            for m in GROUPS:
                mine, theirs = over_seeds(cols[name], b, m), over_seeds(ref, b, m)
                parts.append(f"{m} {_paired(mine.by_seed if mine else {}, theirs.by_seed if theirs else {})}")
            parts.append(f"unsafe - benign {_paired(_keyed_by_seed(cols[name], b), _keyed_by_seed(ref, b))}")
            print(f"  {b} steps, {name}: " + "; ".join(parts))


def _keyed_by_seed(by_seed: dict[int, dict], b: int) -> dict[int, float]:
    """Per attack seed, the unsafe prompts' rate minus the benign prompts' flagged rate."""
    return {s: r[str(b)]["unsafe prompts"]["value"] - r[str(b)]["benign flagged"]["value"]
            for s, r in by_seed.items() if str(b) in r}


def _keyed(by_seed: dict[int, dict], b: int) -> str:
    unsafe, benign = over_seeds(by_seed, b, "unsafe prompts"), over_seeds(by_seed, b, "benign flagged")
    return _paired(unsafe.by_seed, benign.by_seed) if unsafe and benign else "-"


def _paired(mine: dict[int, float], theirs: dict[int, float]) -> str:
    d = paired_difference(mine, theirs)
    return "-" if d is None else str(d)


def _pct(v: OverSeeds | None) -> str:
    return "-" if v is None else f"{100 * v.value:.1f} [{100 * v.lo:.1f}, {100 * v.hi:.1f}]"


if __name__ == "__main__":
    main()
