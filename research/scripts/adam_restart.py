"""Do a model's first attacker steps damp the rest of the attack? The same attack with Adam restarted.

A refusal hands the attacker a first loss many times the usual one; Adam's second-moment estimate
keeps those gradients for hundreds of steps and shrinks every later step. At a rate past the
attacker's best (Adam 1e-3 on the glyph models) a shrunk step is a better one, so the refusal
would help the attacker there the way a smaller learning rate would. The test: attack for 10
steps, start a fresh Adam from where that ended and attack on to 100 and 500 steps in all, and
compare with the uninterrupted attack of the same seed (a decision-grid sweep). On a model whose
first steps are ordinary the restart should change little; where the first steps damp the attack
it should cost the attacker.

    # each model M, name N, attack seed s (0-6 measured; the second attack starts from the first one's end):
    patronus attack M --kind joint --optimizer adam --lr 1e-3 --steps 10 --batch-size 16 --seed s \\
        --out runs/reset-N-joint-lr1e-3-s$s-first10
    patronus attack runs/reset-N-joint-lr1e-3-s$s-first10/step-10 --kind joint --optimizer adam --lr 1e-3 \\
        --steps 490 --batch-size 16 --save-at 90,490 --seed s --out runs/reset-N-joint-lr1e-3-s$s
    patronus evaluate runs/reset-N-joint-lr1e-3-s$s/step-90 --suite glyph --out runs/reset-N-joint-lr1e-3-s$s-eval-90
    # (likewise step-490 -> -eval-490)
    python research/scripts/adam_restart.py \\
        --column "filtered=runs/reset-filtered-joint-lr1e-3,runs/dgj-filtered-lr1e-3" \\
        --column "empty refusal=runs/reset-er-joint-lr1e-3,runs/dgj5-er-plain-gamma10-long"

Each column is NAME=RESET_PREFIX,SWEEP[,SWEEP...]: the restarted attacks' evaluations
(PREFIX-s{seed}-eval-{90,490}) and the sweeps whose `joint` lr 1e-3 cells are the uninterrupted
attacks (seeds 5-9 live in a second sweep). Prints, per model and budget, both means over the
seeds that have both (95% t interval) and the paired difference restarted - uninterrupted; then
each model's difference minus the first column's, paired by seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from patronus.sweep.results import over_seeds, paired_difference, results_by_seed, sweep_summary

CELL = ("joint", "adam", 1e-3)
BUDGETS = {100: 90, 500: 490}  # total attacker steps -> the restarted attack's own step


def uninterrupted(sweeps: list[str]) -> dict[int, dict] | None:
    """Attack seed -> results per budget (done.json's) of the sweeps' `joint` Adam 1e-3 cells."""
    out: dict[int, dict] = {}
    for sweep in sweeps:
        seeds = results_by_seed(sweep_summary(Path(sweep))).get(CELL, {}).get("protected") or {}
        if twice := sorted(seeds.keys() & out.keys()):
            raise SystemExit(f"error: attack seed(s) {twice} are in more than one of {', '.join(sweeps)}")
        out |= seeds
    return out or None


def restarted(prefix: str) -> dict[int, dict]:
    """The same shape for the restarted attacks evaluated so far: seed -> total steps -> metrics."""
    folder, name = Path(prefix).parent, Path(prefix).name
    out: dict[int, dict] = {}
    for total, own in BUDGETS.items():
        for path in folder.glob(f"{name}-s*-eval-{own}/metrics.json"):
            seed = int(path.parent.name.removeprefix(f"{name}-s").split("-")[0])
            out.setdefault(seed, {})[str(total)] = json.loads(path.read_text())["metrics"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--column", action="append", required=True, metavar="NAME=RESET_PREFIX,SWEEP[,SWEEP...]")
    args = p.parse_args()
    effects: dict[str, dict[int, dict[int, float]]] = {}
    for spec in args.column:
        name, _, paths = spec.partition("=")
        prefix, *sweeps = paths.split(",")
        if not sweeps:
            p.error(f"--column {spec!r}: expected NAME=RESET_PREFIX,SWEEP[,SWEEP...]")
        plain, fresh = uninterrupted(sweeps), restarted(prefix)
        if plain is None:
            p.error(f"{', '.join(sweeps)}: no joint Adam 1e-3 cells of a protected model")
        effects[name] = {}
        for b in BUDGETS:
            seeds = sorted(s for s in plain.keys() & fresh.keys() if str(b) in plain[s] and str(b) in fresh[s])
            if len(seeds) < 2:
                print(f"{name}, {b} steps: {len(seeds)} seed(s) with both attacks; need 2")
                continue
            theirs, mine = (over_seeds({s: runs[s] for s in seeds}, b) for runs in (plain, fresh))
            effects[name][b] = {s: mine.by_seed[s] - theirs.by_seed[s] for s in seeds}
            print(f"{name}, {b} steps, seeds {seeds}: uninterrupted {theirs}, Adam restarted after 10 {mine}, "
                  f"restarted - uninterrupted {paired_difference(mine.by_seed, theirs.by_seed)} points")
    first, *others = effects
    for name in others:
        for b in BUDGETS:
            if b in effects[name] and b in effects[first]:
                print(f"{name} - {first}, {b} steps: the restart's effect differs by "
                      f"{paired_difference(effects[name][b], effects[first][b])} points (paired by seed)")


if __name__ == "__main__":
    main()
