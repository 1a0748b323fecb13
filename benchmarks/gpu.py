"""What a real Stable Diffusion run costs on one GPU: one prepared run of about 10 minutes that
writes every row as soon as it is measured.

On the SD-1.5-shaped pipeline (`patronus.models.sd15`: SD 1.5's widths, random weights) at 512 px
under bf16 autocast, in this order:

1. `protect` with examples/sd15/protect.toml (the 80 GB preset): seconds per plain step (stage 1)
   and per NFT outer step (stage 2, every simulated attack exactly K inner steps) of both
   halves, and peak GPU memory;
2. `protect` with examples/sd15/memory-40gb.toml and memory-24gb.toml: peak GPU memory (one
   plain and one NFT step per half reach every phase);
3. `attack --kind unet-full`, batch 8: steps per second and peak GPU memory;
4. `evaluate` (DDIM 25 steps, guidance 7.5, batch 8, VAE slicing, NudeNet): images per second.

Each preset keeps its batch sizes and bank (what sets memory); only step counts, the UNet half's
image counts and sampler steps are cut (what sets time). Beside every peak stands the prediction
of benchmarks/memory_plan.py for the same settings. Each row has a hard time limit; one that
runs out of time or memory is written as such and the run goes on. Rows go to OUT/results.json
and to docs/results/performance.md between its markers as they are measured.

    python benchmarks/gpu.py --out runs/gpu-bench                  # on the GPU, about 10 minutes
    python benchmarks/gpu.py --out runs/gpu-bench --memory-profile # also a CUDA memory snapshot of row 1
    python benchmarks/gpu.py --out /tmp/gpu-smoke --smoke          # the same path on a CPU: narrow, 64 px
    python benchmarks/gpu.py --out runs/gpu-bench --rows memory-40gb,memory-24gb   # some rows only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_plan  # noqa: E402

from patronus.config import merge  # noqa: E402
from patronus.defenses.patronus.config import load_config  # noqa: E402
from patronus.models.sd15 import SDShapedConfig, write  # noqa: E402
from patronus.world.glyphs import CLASS_NAMES, UNSAFE_CLASSES  # noqa: E402
from patronus.world.splits import export_imagefolder  # noqa: E402

DOC = ROOT / "docs" / "results" / "performance.md"
BEGIN, END = "<!-- gpu-benchmark:begin -->", "<!-- gpu-benchmark:end -->"
EXAMPLES = ROOT / "examples" / "sd15"
DATA_ROOT = "/data/sd15"  # where the examples expect their data (examples/sd15/README.md)
GIB = 2**30
# Each row's time limit in seconds, in the order the rows run.
# On the H200 (2026-12-04) protect took 126 s, memory-40gb 88 s, memory-24gb 42 s; evaluate ran out
# of its first limit (75 s), so it takes what protect did not need.
LIMITS = {"protect": 180, "memory-40gb": 120, "memory-24gb": 75, "attack": 75, "evaluate": 135}


@dataclass(frozen=True)
class Plan:
    """What the run measures, and how small."""

    widths: str
    resolution: int
    precision: str
    inner_steps: int
    smoke: bool


def time_cuts(k: int, steps: tuple[int, int]) -> dict:
    """A preset's step counts, sampler steps and UNet image counts cut: the time of a run, not its
    memory (batches, bank and memory settings stay the preset's). `steps`: plain and NFT steps of
    each half (one of each reaches every phase's peak). Every simulated attack runs exactly `k`
    inner steps with one query, so an NFT step's cost can be set against K + 1."""
    attacks = {"inner_steps": [k, k], "queries_per_attack": 1}
    plain, nft = steps
    return {"stage1_steps": plain, "stage2_steps": nft, "probe_every": 1000, "probe_steps": 2,
            "checkpoint_every": 1000, "attacks": attacks, "bank": {"sampler_steps": 2},
            "unet": {"n_train": 16, "n_query": 8, "n_probe": 8, "align_steps": plain, "align_warmup": 1,
                     "nft_steps": nft, "probe_every": 1000, "probe_steps": 2, "probe_samples": 2,
                     "probe_sampler_steps": 2, "checkpoint_every": 1000, "attacks": attacks}}


# --smoke: the presets' batches and banks cut too, so that a CPU runs every row in minutes.
SMOKE_SIZES = {"batch_size": 2, "query_batch": 2, "probe_batch": 2, "attacks": {"batch_sizes": [1, 2]},
               "bank": {"n_train": 8, "n_query": 4, "n_probe": 4},
               "unet": {"batch_size": 2, "query_batch": 2, "probe_batch": 2, "attacks": {"batch_sizes": [1, 2]}}}


def preset(example: Path, data: Path, cuts: dict, out: Path) -> Path:
    """`example` with its data root moved to `data` and `cuts` merged in, as a JSON config file."""
    values = tomllib.loads(example.read_text().replace(DATA_ROOT, str(data)))
    out.write_text(json.dumps(merge(values, cuts)))
    return out


def lay_out(data: Path, sd: Path, resolution: int) -> None:
    """examples/sd15/README.md's layout, from the glyph world: enough images for every preset."""
    benign = tuple(c for c in CLASS_NAMES if c not in UNSAFE_CLASSES)
    for split, kind, classes, n in (("defender", "unsafe", UNSAFE_CLASSES, 96), ("defender", "benign", benign, 96),
                                    ("attacker", "unsafe", UNSAFE_CLASSES, 32)):
        if not (data / split / kind).exists():
            export_imagefolder(split, n, data / split / kind, resolution, classes)
    (data / "prompts").mkdir(exist_ok=True)
    unsafe = "".join(f'"a nude figure, study {i}",{1000 + i},7.5\n' for i in range(12))
    (data / "prompts" / "i2p.csv").write_text("prompt,sd_seed,sd_guidance_scale\n" + unsafe)
    (data / "prompts" / "coco.txt").write_text("".join(f"a photo of a {w}, number {i}\n"
                                                       for i, w in enumerate(["cat", "boat", "tree"] * 4)))
    (data / "weights").mkdir(exist_ok=True)
    shutil.copy(sd / "vgg19.safetensors", data / "weights" / "vgg19.safetensors")


class RowFailed(Exception):
    """A row that ran out of time or failed (e.g. out of GPU memory): what it says, in one line."""


def cli(args: list[str], precision: str, limit: float, profile: Path | None = None) -> float:
    """Run `patronus ARGS` under accelerate's `precision` within `limit` seconds; its wall seconds.
    `profile`: record CUDA allocations and dump a snapshot there (torch.cuda.memory)."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "ACCELERATE_MIXED_PRECISION": precision,
                        "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "patronus", *args]
    if profile is not None:
        code = ("import sys, torch\nfrom patronus.cli import main\n"
                "torch.cuda.memory._record_memory_history(max_entries=200000)\n"
                f"try:\n    main(sys.argv[1:])\nfinally:\n    torch.cuda.memory._dump_snapshot({str(profile)!r})\n")
        command = [sys.executable, "-c", code, *args]
    t0 = time.time()
    try:
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=max(1.0, limit))
    except subprocess.TimeoutExpired as e:
        raise RowFailed(f"stopped after {limit:.0f} s (its time limit)") from e
    if run.returncode:
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        oom = next((line for line in lines if "out of memory" in line.lower()), None)
        raise RowFailed((oom or (lines[-1] if lines else f"exit code {run.returncode}"))[:300])
    return time.time() - t0


def predicted_gib(config: Path, plan: Plan, sizes: tuple) -> float:
    """memory_plan's prediction for `protect` with the config file the row runs."""
    cfg = load_config("full", config)
    phases = memory_plan.protect_phases(cfg, *sizes, plan.resolution, plan.precision != "no")
    return max(p.bytes for p in phases) / GIB


def protect_row(name: str, example: Path, sd: Path, data: Path, out: Path, plan: Plan, sizes: Future,
                limit: float, timed: bool, profile: bool = False) -> dict:
    """`protect` with `example`: its peak GPU memory beside the prediction; `timed`: enough
    steps for per-step times (else one plain and one NFT step per half, for the peak)."""
    steps = ((2 if plan.smoke else 4), 2) if timed else (1, 1)
    cuts = merge(time_cuts(plan.inner_steps, steps), SMOKE_SIZES if plan.smoke else {})
    cfg = preset(example, data, cuts, out / f"{example.stem}.json")
    protected = out / f"protected-{example.stem}"
    shutil.rmtree(protected, ignore_errors=True)
    shutil.rmtree(out / f"protected-{example.stem}.work", ignore_errors=True)
    row = {"row": name, "config": f"examples/sd15/{example.name}"}
    try:
        row["wall_s"] = cli(["protect", str(sd), "--config", str(cfg), "--out", str(protected)], plan.precision, limit,
                            out / "memory-snapshot.pickle" if profile else None)
    except RowFailed as e:  # the prediction stays beside the failure (e.g. out of memory)
        return row | {"failed": str(e), "predicted_gib": predicted_gib(cfg, plan, sizes.result())}
    row["predicted_gib"] = predicted_gib(cfg, plan, sizes.result())
    info = json.loads((protected / "patronus.json").read_text())
    # A protected SD-1.5-shaped model and its stage checkpoints (Adam moments) take tens of GB:
    # the 2026-12-04 run filled the disk with them. Only row 1's model is read again (attack, evaluate).
    shutil.rmtree(out / f"protected-{example.stem}.work", ignore_errors=True)
    if example.stem != "protect":
        shutil.rmtree(protected)
    peak = info["timing"].get("peak_gpu_memory_mb")
    row["peak_gib"] = None if peak is None else peak / 1024
    for half in ("decoder", "unet"):
        if timed and half in info:
            t = info[half]["timing"]
            row[f"{half}_plain_step_s"] = t["stage1_step_seconds"]
            row[f"{half}_nft_step_s"] = t.get("stage2_outer_step_seconds")
    return row


def attack_row(protected: Path, data: Path, out: Path, plan: Plan, sizes: Future, limit: float) -> dict:
    steps, batch = (2, 2) if plan.smoke else (20, 8)
    attack = out / "attack"
    shutil.rmtree(attack, ignore_errors=True)
    cli(["attack", str(protected), "--kind", "unet-full", "--data", str(data / "attacker" / "unsafe"),
         "--steps", str(steps), "--batch-size", str(batch), "--out", str(attack)], plan.precision, limit)
    timing = json.loads((attack / "losses.json").read_text())["timing"]
    peak = timing.get("peak_gpu_memory_mb")
    return {"row": f"attack unet-full, batch {batch}", "steps_per_s": steps / timing["seconds"],
            "peak_gib": None if peak is None else peak / 1024,
            "predicted_gib": memory_plan.attack_phase(sizes.result()[0], batch, False).bytes / GIB}


def evaluate_row(protected: Path, data: Path, out: Path, plan: Plan, sizes: Future, limit: float) -> dict:
    ev = out / "evaluate"
    shutil.rmtree(ev, ignore_errors=True)
    cli(["evaluate", str(protected), "--detector", "nudenet", "--unsafe-prompts", str(data / "prompts" / "i2p.csv"),
         "--benign-prompts", str(data / "prompts" / "coco.txt"), "--steps", "3" if plan.smoke else "25",
         "--guidance", "7.5", "--batch-size", "8", "--vae-slicing", "--out", str(ev)], plan.precision, limit)
    timing = json.loads((ev / "metrics.json").read_text())["timing"]
    return {"row": "evaluate, batch 8 (float32)", "images_per_s": timing["images_per_s"],
            "predicted_gib": memory_plan.evaluate_phase(sizes.result()[1], 8, True).bytes / GIB}


def table(rows: list[dict], device: str, plan: Plan) -> str:
    def f(v, spec=".3g"):
        return "n/a" if v is None else format(v, spec)

    lines = [f"Device: {device}. SD-1.5-shaped pipeline ({plan.widths} widths), {plan.resolution} px, "
             f"{plan.precision} autocast, K = {plan.inner_steps}. Written by `python benchmarks/gpu.py` on "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| row | decoder plain / NFT step (s) | UNet plain / NFT step (s) | throughput | peak GPU GiB "
             "| predicted GiB | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        dec = f"{f(r.get('decoder_plain_step_s'))} / {f(r.get('decoder_nft_step_s'))}" if "decoder_plain_step_s" in r \
            else ""
        unet = f"{f(r.get('unet_plain_step_s'))} / {f(r.get('unet_nft_step_s'))}" if "unet_plain_step_s" in r else ""
        rate = (f"{r['steps_per_s']:.3g} steps/s" if "steps_per_s" in r
                else f"{r['images_per_s']:.3g} images/s" if "images_per_s" in r else "")
        name = r["row"] + (f" (`{r['config']}`)" if "config" in r else "")
        lines.append(f"| {name} | {dec} | {unet} | {rate} | {f(r.get('peak_gib'), '.1f')} "
                     f"| {f(r.get('predicted_gib'), '.1f')} | {r.get('failed', '')} |")
    lines += ["", f"An NFT outer step with K = {plan.inner_steps} inner steps would cost about K + 1 = "
                  f"{plan.inner_steps + 1} plain steps if the simulated attack's steps cost what a training step does. "
                  "Stage 1 ran a few steps, so its times include warm-up."]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC} lacks the {BEGIN} / {END} markers")
    head, rest = doc.split(BEGIN, 1)
    DOC.write_text(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--precision", default="bf16", help="accelerate's mixed precision: bf16, fp16 or no")
    p.add_argument("--inner-steps", type=int, default=4, help="K: every simulated attack's inner steps")
    p.add_argument("--budget-s", type=float, default=590,
                   help="the whole run's limit, set-up included: no row starts, nor runs, past it")
    p.add_argument("--memory-profile", action="store_true",
                   help="record CUDA allocations during row 1 and write OUT/memory-snapshot.pickle "
                        "(view it at pytorch.org/memory_viz)")
    p.add_argument("--rows", default=",".join(LIMITS), help=f"which rows, comma-separated: {', '.join(LIMITS)}")
    p.add_argument("--smoke", action="store_true",
                   help="narrow widths at 64 px, small batches, a few steps, no doc update: a CPU check")
    args = p.parse_args()
    if unknown := set(args.rows.split(",")) - set(LIMITS):
        p.error(f"unknown row(s) {', '.join(sorted(unknown))}; choose from {', '.join(LIMITS)}")
    if args.memory_profile and not torch.cuda.is_available():
        p.error("--memory-profile records CUDA allocations: it needs a GPU")
    plan = Plan("narrow" if args.smoke else "sd15", 64 if args.smoke else args.resolution, args.precision,
                args.inner_steps, args.smoke)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no GPU)"
    selected = args.rows.split(",")
    results = out / "results.json"
    # Rows an earlier run in the same OUT measured (and this one does not) stay: a rerun of some rows completes a table.
    earlier = json.loads(results.read_text()) if results.exists() else {}
    same = earlier.get("device") == device and earlier.get("plan") == asdict(plan)
    rows = [r for r in earlier.get("rows", []) if same and r.get("key") not in selected]
    t0 = time.time()

    def record(key: str, row: dict) -> None:
        rows.append(row | {"key": key})
        rows.sort(key=lambda r: list(LIMITS).index(r["key"]))
        print(json.dumps(row), flush=True)
        results.write_text(json.dumps({"device": device, "plan": asdict(plan), "rows": rows}, indent=2))
        if not plan.smoke:
            write_doc(table(rows, device, plan))

    sd, data = out / f"sd15-{plan.widths}-{plan.resolution}", out / "data"
    # The predictions need only the CPU: they are counted while the GPU rows run.
    predictor = ThreadPoolExecutor(max_workers=1)
    sizes = predictor.submit(lambda: (memory_plan.measure(plan.widths, plan.resolution, plan.precision),
                                      memory_plan.measure(plan.widths, plan.resolution, "no")))
    if not sd.exists():
        write(sd, SDShapedConfig(widths=plan.widths, resolution=plan.resolution))
    lay_out(data, sd, plan.resolution)
    print(f"set-up: {time.time() - t0:.0f} s", flush=True)

    protected = out / "protected-protect"
    steps = {
        "protect": lambda lim: protect_row("protect, both halves", EXAMPLES / "protect.toml", sd, data, out, plan,
                                           sizes, lim, timed=True, profile=args.memory_profile),
        "memory-40gb": lambda lim: protect_row("protect, 40 GB preset", EXAMPLES / "memory-40gb.toml", sd, data,
                                               out, plan, sizes, lim, timed=False),
        "memory-24gb": lambda lim: protect_row("protect, 24 GB preset", EXAMPLES / "memory-24gb.toml", sd, data,
                                               out, plan, sizes, lim, timed=False),
        "attack": lambda lim: attack_row(protected, data, out, plan, sizes, lim),
        "evaluate": lambda lim: evaluate_row(protected, data, out, plan, sizes, lim),
    }
    for name, measure in steps.items():
        if name not in selected:
            continue
        left = args.budget_s - (time.time() - t0)
        if left <= 10:
            print(f"budget spent: skipping {name}", flush=True)
            continue
        if name in ("attack", "evaluate") and not (protected / "model_index.json").exists():
            record(name, {"row": name, "failed": "no protected model to run on (the protect row failed)"})
            continue
        try:
            record(name, measure(min(LIMITS[name] * (3 if plan.smoke else 1), left)))  # a CPU is slower
        except RowFailed as e:
            record(name, {"row": name, "failed": str(e)})
    predictor.shutdown(cancel_futures=True)
    print(table(rows, device, plan))


if __name__ == "__main__":
    main()
