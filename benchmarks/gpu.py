"""What a real Stable Diffusion run costs on a GPU: the one prepared script for one GPU (measured on an NVIDIA H200).

For the SD-1.5-shaped pipeline (`patronus.models.sd15`, SD 1.5's widths, random weights) at
each resolution and precision it runs a short `protect` (both halves, VGG-19 perceptual loss,
simulated attacks of exactly K inner steps), a `unet-full` attack and an `evaluate`, and reads
their own timing records:

- protect: seconds per stage-1 step (no simulated attack: the plain step) and per stage-2
  outer step (K inner steps + query + the defender's terms), their ratio against K + 1, and
  peak GPU memory;
- attack: `unet-full` Adam steps per second and peak GPU memory;
- evaluation: images per second (DDIM 25 steps, guidance 7.5).

Then, budget allowing, the tiny model's full preset (`protect patronus-tiny --preset full`)
wall time. Each row is written to OUT/results.json as soon as it is measured, and the table
to docs/results/performance.md between its markers, so a run cut short still reports what it did.

    python benchmarks/gpu.py --out runs/gpu-bench               # on the GPU (about 10 minutes)
    python benchmarks/gpu.py --out /tmp/gpu-smoke --smoke       # the same path on a CPU, in minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from patronus.models.sd15 import SDShapedConfig, write  # noqa: E402
from patronus.world.glyphs import CLASS_NAMES, UNSAFE_CLASSES  # noqa: E402
from patronus.world.splits import export_imagefolder  # noqa: E402

DOC = ROOT / "docs" / "results" / "performance.md"
BEGIN, END = "<!-- gpu-benchmark:begin -->", "<!-- gpu-benchmark:end -->"


def protect_config(k: int, smoke: bool, folders: dict[str, Path], vgg: Path) -> dict:
    """Both halves for a few steps, every simulated attack exactly `k` inner steps, probes minimal."""
    n = 4 if smoke else 16
    steps1, steps2 = (2, 2) if smoke else (10, 3)
    attacks = {"inner_steps": [k, k], "batch_sizes": [2, 2] if smoke else [8, 8], "queries_per_attack": 1}
    return {
        "perceptual": "vgg19", "vgg_weights": str(vgg), "batch_size": 4 if smoke else 16, "query_batch": 4,
        "stage1_steps": steps1, "stage2_steps": steps2, "probe_every": 1000, "probe_steps": 1, "probe_batch": 2,
        "checkpoint_every": 1000, "attacks": attacks,
        "bank": {"n_train": n, "n_query": n // 2, "n_probe": n // 2, "sampler_steps": 2 if smoke else 10,
                 "unsafe_dir": str(folders["unsafe"]), "benign_dir": str(folders["benign"])},
        "unet": {"n_train": n, "n_query": n // 2, "n_probe": n // 2, "batch_size": 4 if smoke else 8,
                 "query_batch": 2 if smoke else 8, "align_steps": steps1, "align_warmup": 1, "nft_steps": steps2,
                 "probe_every": 1000, "probe_steps": 1, "probe_batch": 2, "probe_samples": 1,
                 "probe_sampler_steps": 1, "checkpoint_every": 1000, "attacks": attacks},
    }


def cli(args: list[str], precision: str) -> float:
    """Run `patronus ARGS` under accelerate's `precision`; its wall seconds."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "ACCELERATE_MIXED_PRECISION": precision,
                        "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.time()
    run = subprocess.run([sys.executable, "-m", "patronus", *args], capture_output=True, text=True, env=env)
    if run.returncode:
        raise RuntimeError(f"patronus {' '.join(args[:2])} failed:\n{run.stderr[-3000:]}")
    return time.time() - t0


def measure_sd(out: Path, resolution: int, precision: str, k: int, smoke: bool) -> dict:
    sd = out / f"sd15-{resolution}"
    if not sd.exists():
        write(sd, SDShapedConfig(widths="narrow" if smoke else "sd15", resolution=resolution))
    data = out / f"data-{resolution}"
    benign = tuple(c for c in CLASS_NAMES if c not in UNSAFE_CLASSES)
    folders = {kind: data / kind for kind in ("unsafe", "benign")}
    for kind, classes in (("unsafe", UNSAFE_CLASSES), ("benign", benign)):
        if not folders[kind].exists():
            export_imagefolder("defender", 64, folders[kind], resolution, classes)
    tag = f"{resolution}-{precision}"
    cfg = out / f"protect-{tag}.json"
    cfg.write_text(json.dumps(protect_config(k, smoke, folders, sd / "vgg19.safetensors")))
    protected = out / f"protected-{tag}"
    cli(["protect", str(sd), "--preset", "quick", "--config", str(cfg), "--out", str(protected)], precision)
    info = json.loads((protected / "patronus.json").read_text())
    row = {"model": f"SD-1.5-shaped {'(narrow, smoke)' if smoke else ''}".strip(), "resolution": resolution,
           "precision": precision, "inner_steps": k, "peak_gpu_memory_mb": info["timing"].get("peak_gpu_memory_mb")}
    for half in ("decoder", "unet"):
        t = info[half]["timing"]
        row[f"{half}_plain_step_s"] = t["stage1_step_seconds"]
        row[f"{half}_nft_step_s"] = t["stage2_outer_step_seconds"]
        row[f"{half}_nft_ratio"] = t["stage2_outer_step_seconds"] / t["stage1_step_seconds"]
    attack = out / f"attack-{tag}"
    steps = 2 if smoke else 20
    cli(["attack", str(protected), "--kind", "unet-full", "--data", str(folders["unsafe"]), "--steps", str(steps),
         "--batch-size", "2" if smoke else "8", "--out", str(attack)], precision)
    timing = json.loads((attack / "losses.json").read_text())["timing"]
    row["attack_steps_per_s"] = steps / timing["seconds"]
    row["attack_peak_gpu_memory_mb"] = timing.get("peak_gpu_memory_mb")
    prompts = out / "prompts.txt"
    prompts.write_text("".join(f"a photo of a {w}, number {i}\n" for i, w in enumerate(["cat", "boat", "tree"] * 8)))
    ev = out / f"eval-{tag}"
    cli(["evaluate", str(protected), "--unsafe-prompts", str(prompts), "--benign-prompts", str(prompts), "--steps",
         "3" if smoke else "25", "--guidance", "7.5", "--batch-size", "8", "--vae-slicing", "--out", str(ev)],
        precision)
    row["eval_images_per_s"] = json.loads((ev / "metrics.json").read_text())["timing"]["images_per_s"]
    return row


def measure_tiny_full(out: Path) -> dict:
    seconds = cli(["protect", "patronus-tiny", "--preset", "full", "--out", str(out / "tiny-full")], "no")
    return {"model": "patronus-tiny, full preset", "wall_s": seconds}


def table(rows: list[dict], device: str) -> str:
    def f(v, spec=".3g"):
        return "n/a" if v is None else format(v, spec)

    lines = [f"Device: {device}. Written by `python benchmarks/gpu.py` on {time.strftime('%Y-%m-%d')}.", "",
             "| model | px | precision | K | decoder plain / NFT step (s) | ratio | UNet plain / NFT step (s) | ratio "
             "| protect peak GPU MB | attack steps/s | attack peak GPU MB | eval images/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "wall_s" in r:
            cells = [r["model"], "32", "fp32", "", f"wall time {r['wall_s'] / 60:.1f} min"] + [""] * 7
            lines.append("| " + " | ".join(cells) + " |")
            continue
        lines.append(
            f"| {r['model']} | {r['resolution']} | {r['precision']} | {r['inner_steps']} "
            f"| {f(r['decoder_plain_step_s'])} / {f(r['decoder_nft_step_s'])} | {f(r['decoder_nft_ratio'])} "
            f"| {f(r['unet_plain_step_s'])} / {f(r['unet_nft_step_s'])} | {f(r['unet_nft_ratio'])} "
            f"| {f(r['peak_gpu_memory_mb'], '.0f')} | {f(r['attack_steps_per_s'])} "
            f"| {f(r['attack_peak_gpu_memory_mb'], '.0f')} | {f(r['eval_images_per_s'])} |")
    k = next((r["inner_steps"] for r in rows if "inner_steps" in r), None)
    if k is not None:
        lines += ["", f"An NFT outer step with K = {k} inner steps would cost about K + 1 = {k + 1} plain steps if "
                      "the simulated attack's steps cost what a training step does. The stage-2 times include one "
                      "minimal probe, spread over the few outer steps run."]
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
    p.add_argument("--resolutions", default="512,256", help="comma-separated, measured in this order")
    p.add_argument("--precisions", default="bf16,no", help="accelerate's mixed precision: bf16, fp16 or no")
    p.add_argument("--inner-steps", type=int, default=4, help="K: every simulated attack's inner steps")
    p.add_argument("--budget-s", type=float, default=480, help="start no new measurement after this many seconds")
    p.add_argument("--tiny-full", action="store_true", help="also time the tiny model's full preset (~6 min)")
    p.add_argument("--smoke", action="store_true", help="narrow widths, a few steps, no doc update: a CPU check")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no GPU)"
    t0, rows = time.time(), []
    plan = [(int(r), pr) for r in args.resolutions.split(",") for pr in args.precisions.split(",")]
    for resolution, precision in plan:
        if time.time() - t0 > args.budget_s:
            print(f"budget spent: skipping {resolution} px {precision}")
            continue
        rows.append(measure_sd(out, resolution, precision, args.inner_steps, args.smoke))
        print(json.dumps(rows[-1]), flush=True)
        (out / "results.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
        if not args.smoke:
            write_doc(table(rows, device))
    if args.tiny_full and time.time() - t0 <= args.budget_s:
        rows.append(measure_tiny_full(out))
        (out / "results.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
        if not args.smoke:
            write_doc(table(rows, device))
    print(table(rows, device))


if __name__ == "__main__":
    main()
