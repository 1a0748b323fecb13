"""The UNet half's numbers: no-attack table, decoder swap, the UNet decision grid.

    python benchmarks/unet.py --decoder runs/protected-v3 --unet runs/unet-only --out runs/bench-unet \
        [--both runs/protected-both] [--nft0 runs/unet-nft0] [--grid reproduce/grid-unet-decision.toml]

1. Models. `--decoder` is a decoder-only protection (`--parts decoder`), `--unet` a UNet-only one
   (`--parts unet`, made with the full preset when missing, resumable). The two-part model is
   `--both` when given (`patronus protect --parts decoder,unet`); otherwise it is assembled from
   the two single-part runs (their VAE and UNet), which gives the same weights: with the default
   `bank.unet_sources` the halves are independent (tests/defenses/test_align.py checks it on a
   miniature pipeline).
2. No attack: the evaluation harness on base / decoder only / UNet only / both, and on both with
   the original VAE put back (`swap-decoder`): unsafe rate per prompt group, refusal, false
   refusal, benign class and colour against the base.
3. The UNet decision grid (`patronus sweep` with `--grid`) on the two-part model, with its
   unprotected original, a scratch UNet and the `original-vae` reference (the same attacked
   UNets rendered by the original decoder: the UNet alone under attack, which is also what the
   UNet-only model gives). Cells are cached by the sweep, so a killed run resumes.
4. With `--nft0` (a UNet-only run with `w_nft = 0`, research/configs/protect-unet-nft0.toml): its
   no-attack row, and the same grid on it without references (its decoder is the original, so
   its rows compare with the two-part sweep's original-vae rows and that sweep's scratch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from patronus.attacks.config import AttackConfig
from patronus.attacks.registry import run_attack
from patronus.defenses.patronus.config import load_config
from patronus.defenses.patronus.protect import protect
from patronus.evaluation.harness import EvalConfig, evaluate
from patronus.io import atomic_dir
from patronus.models.registry import resolve_model
from patronus.report import build_report
from patronus.sweep.grid import load_grid
from patronus.sweep.results import ratio_summary, robustness_ratios, unsafe_rates_by_cell
from patronus.sweep.runner import run_sweep

GROUPS = ("explicit", "synonym", "held_out")


def ensure_unet_only(base: str, out: Path) -> dict:
    if not (out / "patronus.json").exists():
        print(f"protecting the UNet of {base} (full preset) -> {out}", flush=True)
        protect(base, out, load_config("full", parts="unet"), out.with_name(out.name + ".work"), resume=True)
    return json.loads((out / "patronus.json").read_text())


def assemble_both(decoder: Path, unet: Path, out: Path) -> Path:
    """The two-part model from single-part runs of the same source: decoder run's VAE, UNet run's UNet."""
    infos = [json.loads((d / "patronus.json").read_text()) for d in (decoder, unet)]
    if infos[0]["source_model"]["weights_sha256"] != infos[1]["source_model"]["weights_sha256"]:
        raise SystemExit(f"error: {decoder} and {unet} were protected from different models")
    if not out.exists():
        with atomic_dir(out) as tmp:
            shutil.copytree(unet, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("vae", "patronus.json"))
            shutil.copytree(decoder / "vae", tmp / "vae")
            (tmp / "assembled-from.json").write_text(json.dumps({"decoder": str(decoder), "unet": str(unet)}))
    return out


def _pct(m: dict, key: str) -> str:
    return f"{100 * m[key]['value']:.1f}%" if key in m else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decoder", required=True, help="a decoder-only protection (patronus protect --parts decoder)")
    ap.add_argument("--unet", required=True, help="a UNet-only protection (made with the full preset when missing)")
    ap.add_argument("--both", help="a two-part protection; default: assembled from --decoder and --unet")
    ap.add_argument("--nft0", help="a UNet-only protection with w_nft = 0 (the NFT ablation)")
    ap.add_argument("--base", default="patronus-tiny")
    ap.add_argument("--grid", default="reproduce/grid-unet-decision.toml")
    ap.add_argument("--suite", default="glyph")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = load_grid(args.grid)  # a bad grid fails before any work
    unet_info = ensure_unet_only(args.base, Path(args.unet))
    t, peak = unet_info["unet"]["timing"], unet_info["timing"]["peak_memory_mb"]
    print(f"protect --parts unet: {t['total_seconds'] / 60:.1f} min (stage 1 {t.get('stage1_step_seconds', 0):.2f} "
          f"s/step, stage 2 {t.get('stage2_outer_step_seconds', 0):.2f} s/outer step at "
          f"{t.get('mean_inner_steps', 0):.1f} inner steps), peak memory {peak:.0f} MB")
    both = Path(args.both) if args.both else assemble_both(Path(args.decoder), Path(args.unet), out / "both")
    resolve_model(str(both))
    swapped = out / "both-original-vae"
    if not swapped.exists():
        run_attack(str(both), AttackConfig("swap-decoder", swap_from=args.base), swapped, progress=False)
    models = {"base": args.base, "decoder-only": args.decoder, "unet-only": args.unet, "both": str(both),
              "both+original-vae": str(swapped / "step-0")} | ({"unet-only-nft0": args.nft0} if args.nft0 else {})

    settings = EvalConfig(suite=args.suite)
    metrics = {}
    for name, model in models.items():
        d = out / f"eval-{name}"
        if not (d / "metrics.json").exists():
            evaluate(model, d, settings, reference=None if name == "base" else args.base)
        metrics[name] = json.loads((d / "metrics.json").read_text())["metrics"]
    base = metrics["base"]
    print(f"\nno attack ({args.suite} suite):")
    for name, m in metrics.items():
        groups = " ".join(f"{g}={_pct(m, f'unsafe_rate[group={g}]')}" for g in GROUPS)
        print(f"  {name:18s} unsafe {groups} | refusal {_pct(m, 'refusal_rate')} | false refusal benign "
              f"{_pct(m, 'false_refusal_rate[benign]')} hard-neg {_pct(m, 'false_refusal_rate[hard_negative]')} | "
              f"benign class {_pct(m, 'benign_class_match')} (base {_pct(base, 'benign_class_match')}) colour "
              f"{_pct(m, 'benign_color_match')} (base {_pct(base, 'benign_color_match')})")

    sweep = run_sweep(models["both"], grid, out / "sweep-both", unprotected=args.base, workers=args.workers)
    summary = {"no_attack": metrics, "sweep": sweep}
    rates = unsafe_rates_by_cell(sweep)
    print(f"\ntwo-part model, {args.grid}: unsafe rate at " + ", ".join(map(str, grid.budgets)) + " steps")
    for key, by_model in sorted(rates.items()):
        print(f"  {'/'.join(map(str, key)):28s} " + " | ".join(
            f"{m} " + " ".join(f"{100 * r[b]:.0f}%" for b in sorted(r)) for m, r in sorted(by_model.items())))
    for model in ("protected", "original-vae"):
        print(f"  {model}: " + ratio_summary(robustness_ratios(rates, model=model), model))
    if args.nft0:
        alone = dataclasses.replace(grid, references=())
        nft0 = run_sweep(args.nft0, alone, out / "sweep-unet-nft0", unprotected=args.base, workers=args.workers)
        summary["sweep_nft0"] = nft0
        print(f"\nUNet-only NFT-0 ablation (original decoder), {args.grid}: unsafe rate at "
              + ", ".join(map(str, grid.budgets)) + " steps")
        for key, by_model in sorted(unsafe_rates_by_cell(nft0).items()):
            with_refs = rates.get(key, {}) | {"nft0": by_model["protected"]}
            print(f"  {'/'.join(map(str, key)):28s} " + " | ".join(
                f"{m} " + " ".join(f"{100 * r[b]:.0f}%" for b in sorted(r))
                for m, r in sorted(with_refs.items()) if m in ("nft0", "original-vae", "scratch")))
        nft0_rates = {k: {"nft0": m["protected"], "scratch": rates.get(k, {}).get("scratch")}
                      for k, m in unsafe_rates_by_cell(nft0).items() if rates.get(k, {}).get("scratch")}
        print("  nft0: " + ratio_summary(robustness_ratios(nft0_rates, model="nft0"), "nft0"))
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    shutil.rmtree(out / "report", ignore_errors=True)
    build_report([out / f"eval-{n}" for n in models] + [out / "sweep-both"]
                 + ([out / "sweep-unet-nft0"] if args.nft0 else []), out / "report")
    print(f"\nwrote {out / 'results.json'} and {out / 'report' / 'report.html'}")


if __name__ == "__main__":
    main()
