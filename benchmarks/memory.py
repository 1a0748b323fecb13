"""Peak memory (resident set) of each command on the shipped tiny model, for docs/results/performance.md.

    python benchmarks/memory.py --out runs/bench-memory

Each command runs in its own process; its peak RSS is the child's `ru_maxrss`. Settings are
small (few steps) because peak memory is set by what is loaded and the batch, not by how
long a loop runs. `protect` records its own peak in patronus.json (`timing.peak_memory_mb`),
so it is read from a protect output given with `--protect` instead of being rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path


def peak_mb(args: list[str]) -> float:
    """Run `python -m patronus ARGS` in a fresh process and return its peak RSS in MB."""
    code = ("import resource, subprocess, sys\n"
            "r = subprocess.run([sys.executable, '-m', 'patronus', *sys.argv[1:]], stdout=subprocess.DEVNULL)\n"
            "assert r.returncode == 0, r\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if out.returncode != 0:
        raise SystemExit(f"error: patronus {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--protect", action="append", default=[], help="protect outputs to read peak memory from")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"error: {out} exists; choose another --out")
    out.mkdir(parents=True)
    grid = out / "grid.toml"
    grid.write_text('kinds = ["unet-lora", "decoder-full"]\nranks = [4]\noptimizers = ["adam"]\nlrs = [1e-3]\n'
                    'budgets = [5]\nsuite = "glyph-quick"\nreferences = ["unprotected"]\n')
    commands = {
        "generate (8 images)": ["generate", "patronus-tiny", "a red star", "--n", "8", "--out", str(out / "gen")],
        "evaluate (glyph-quick)": ["evaluate", "patronus-tiny", "--suite", "glyph-quick", "--out", str(out / "ev")],
        "evaluate (glyph, 432 images)": ["evaluate", "patronus-tiny", "--out", str(out / "ev-full")],
        "attack unet-full (batch 16)": ["attack", "patronus-tiny", "--kind", "unet-full", "--steps", "5",
                                        "--save-at", "5", "--out", str(out / "a1")],
        "attack decoder-full (batch 16)": ["attack", "patronus-tiny", "--kind", "decoder-full", "--steps", "5",
                                           "--save-at", "5", "--out", str(out / "a2")],
        "attack joint (batch 16)": ["attack", "patronus-tiny", "--kind", "joint", "--steps", "5", "--save-at", "5",
                                    "--out", str(out / "a3")],
        "sweep (2 cells x 2 models, 1 worker)": ["sweep", "patronus-tiny", "--grid", str(grid), "--out",
                                                 str(out / "sweep")],
        "report": ["report", str(out / "ev"), "--out", str(out / "rep")],
        "verify": ["verify", "patronus-tiny-protected"],
        "export-split (1000 images)": ["export-split", "attacker", "--out", str(out / "split")],
    }
    rows = {name: peak_mb(cmd) for name, cmd in commands.items()}
    for p in args.protect:
        info = json.loads((Path(p) / "patronus.json").read_text())
        rows[f"protect {' + '.join(info['parts'])} ({p})"] = info["timing"]["peak_memory_mb"]
    print("| command | peak RSS (MB) |\n|---|---|")
    for name, mb in rows.items():
        print(f"| {name} | {mb:.0f} |")
    (out / "memory.json").write_text(json.dumps(rows, indent=2))
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
