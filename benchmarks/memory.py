"""Peak memory (resident set) of each command on the shipped tiny model, for docs/results/performance.md.

    python benchmarks/memory.py --out runs/bench-memory
    python benchmarks/memory.py --out runs/bench-memory-sd15 --sd15 examples/sd15/memory-40gb.toml \
        --set frozen_dtype=bfloat16 --set best_checkpoint=disk

`--sd15 CONFIG` measures instead `protect` with both halves on the SD-1.5-shaped pipeline
(SD 1.5's widths, random weights) at 64 px in float32 on this machine, with CONFIG's settings, its
data from the glyph world and a few steps of each stage (`SD15_STEPS`), beside
benchmarks/memory_plan.py's prediction for the same settings on a CPU.

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
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import memory_plan  # noqa: E402
from gpu import lay_out, preset  # noqa: E402

from patronus.config import merge  # noqa: E402
from patronus.defenses.patronus.config import load_config  # noqa: E402
from patronus.models.sd15 import SDShapedConfig, write  # noqa: E402

# A few steps of each stage and small counts: peak memory is set by what is loaded and the batch.
SD15_STEPS = {
    "stage1_steps": 2, "stage2_steps": 2, "probe_every": 2, "probe_steps": 2, "checkpoint_every": 2,
    "attacks": {"inner_steps": [1, 2], "queries_per_attack": 1},
    "bank": {"sampler_steps": 2},
    "unet": {"n_train": 8, "n_query": 4, "n_probe": 4, "align_steps": 2, "align_warmup": 1, "nft_steps": 2,
             "probe_every": 2, "probe_steps": 2, "probe_samples": 2, "probe_sampler_steps": 2,
             "checkpoint_every": 2, "attacks": {"inner_steps": [1, 2], "queries_per_attack": 1}},
}


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


def _setting(text: str) -> dict:
    """`key.sub=value` (a TOML value, or a bare string) as a nested dict."""
    key, _, value = text.partition("=")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    for part in reversed(key.split(".")):
        parsed = {part: parsed}
    return parsed


def sd15_protect(out: Path, example: Path, settings: list[str], widths: str = "sd15") -> None:
    """Peak RSS of `protect` on the SD-1.5-shaped pipeline at 64 px, beside its prediction."""
    sd, data = out / "sd15", out / "data"
    write(sd, SDShapedConfig(widths=widths, resolution=64))
    lay_out(data, sd, 64)  # examples/sd15/README.md's layout under `data`, as benchmarks/gpu.py runs the examples
    cuts: dict = {}
    for text in settings:
        cuts = merge(cuts, _setting(text))
    config = preset(example, data, merge(cuts, SD15_STEPS), out / "protect.json")
    cfg = load_config("quick", config)  # refused here, before the model is built, if a setting is wrong
    sizes = memory_plan.measure(widths, 64, "no")
    phases = memory_plan.protect_phases(cfg, sizes, sizes, 64, mixed=False, device="cpu")
    peak = max(phases, key=lambda ph: ph.bytes)
    measured = peak_mb(["protect", str(sd), "--preset", "quick", "--config", str(config), "--out", str(out / "p")])
    print(f"protect, both halves, {widths} widths at 64 px, float32, {example.name} {' '.join(settings)}:")
    print(f"peak RSS {measured:.0f} MB ({measured / 1024:.1f} GiB); predicted {peak.bytes / 2**30:.1f} GiB "
          f"in {peak.name} (benchmarks/memory_plan.py, --device cpu)")
    print(memory_plan.table(phases))
    (out / "memory.json").write_text(json.dumps({"peak_rss_mb": measured, "predicted_gib": peak.bytes / 2**30,
                                                 "predicted_phase": peak.name, "settings": settings}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--protect", action="append", default=[], help="protect outputs to read peak memory from")
    ap.add_argument("--sd15", type=Path, help="a protect config (examples/sd15/): measure it on the SD-1.5-shaped "
                                              "pipeline at 64 px instead")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="with --sd15: a setting over the config, e.g. frozen_dtype=bfloat16")
    ap.add_argument("--widths", default="sd15", choices=["sd15", "narrow"], help="with --sd15: the pipeline's widths")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"error: {out} exists; choose another --out")
    if args.sd15 and not args.sd15.is_file():
        raise SystemExit(f"error: --sd15 {args.sd15} is not a file")
    out.mkdir(parents=True)
    if args.sd15:
        return sd15_protect(out, args.sd15, args.set, args.widths)
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
