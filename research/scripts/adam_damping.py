"""How far does each model's own attack move it, step by step? Adam's update size along a `joint` attack.

The restart test (`adam_restart.py`) says the empty refusal's first attacker steps change how the
rest of a `joint` Adam 1e-3 attack goes. Adam's step on a weight is lr x m / sqrt(v); a first loss
many times the usual one fills v with large squared gradients that decay only at 0.999 a step, so
every later step is smaller, as if the attacker had picked a smaller rate. This script measures
that directly: it runs the same attack as `patronus attack` (same loop, batches and seeds) and
records, at every step, the root-mean-square update and gradient of each trained component, and
for each block the mean update over the steps after the first ten. A damped model's later
updates are smaller than the reference's; the block table says where.

    python research/scripts/adam_damping.py --model filtered=patronus-tiny-filtered \\
        --model black=runs/unet-full-er-plain-gamma10-long-filtered --seeds 0,1 --steps 100

Run it with plain `python` (one process). The first --model is the reference of the ratios. The
gradients it records are the ones the optimizer steps with (after clipping, with --max-grad-norm).
Prints, per model, the update RMS of the UNet, the text encoder and the decoder over steps 1-10
and 11-N (mean over seeds), the ratio of the later one to the reference's, the effective learning
rate that ratio stands for, and the blocks whose later updates differ most from the reference's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

import patronus.attacks.weights.finetune as finetune
from patronus.attacks.config import AttackConfig
from patronus.models.registry import load_pipeline


def block_of(name: str) -> str:
    """A parameter's block: its name up to the first numbered level (`unet.down_blocks.1`,
    `vae.decoder.up_blocks.0`), or its first two levels where none is numbered (`unet.conv_in`)."""
    parts = name.split(".")
    numbered = next((i for i, p in enumerate(parts[:-1]) if p.isdigit()), None)
    return ".".join(parts[:numbered + 1] if numbered is not None else parts[:2])


def record(model: str, seed: int, lr: float, steps: int, batch_size: int, max_grad_norm: float | None) -> dict:
    """One `joint` Adam attack on `model`; per step and component: update and gradient RMS; per
    block: summed squared update and weight count over steps 11-`steps`."""
    pipe = load_pipeline(model)
    names = {id(p): f"{c}.{n}" for c, m in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder),
                                             ("vae", pipe.vae)) for n, p in m.named_parameters()}
    trace: dict[str, list[list[float]]] = defaultdict(list)  # component -> per step [update RMS, grad RMS]
    late: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # block -> [sum of squared updates, weights x steps]
    make = finetune.make_optimizer

    def make_recording(name: str, rate: float, params):
        opt = make(name, rate, params)
        before: dict[int, torch.Tensor] = {}
        step = [0]

        def pre(optimizer, *_):
            before.update({id(p): p.detach().clone() for g in optimizer.param_groups for p in g["params"]})

        def post(optimizer, *_):
            step[0] += 1
            sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
            for g in optimizer.param_groups:
                for p in g["params"]:
                    full = names[id(p)]
                    d2 = float(((p.detach() - before[id(p)]).double() ** 2).sum())
                    g2 = 0.0 if p.grad is None else float((p.grad.double() ** 2).sum())
                    s = sums[full.split(".")[0]]
                    s[0], s[1], s[2] = s[0] + d2, s[1] + g2, s[2] + p.numel()
                    if step[0] > 10:
                        b = late[block_of(full)]
                        b[0], b[1] = b[0] + d2, b[1] + p.numel()
            for comp, (d2, g2, n) in sums.items():
                trace[comp].append([(d2 / n) ** 0.5, (g2 / n) ** 0.5])
            before.clear()

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)
        return opt

    cfg = AttackConfig(kind="joint", optimizer="adam", lr=lr, steps=steps, batch_size=batch_size,
                       save_at=(steps,), seed=seed, max_grad_norm=max_grad_norm)
    finetune.make_optimizer = make_recording
    try:
        with tempfile.TemporaryDirectory() as tmp:
            finetune.run_finetune(pipe, cfg, Path(tmp), progress=False)
            losses = json.loads((Path(tmp) / "losses.json").read_text())["loss_per_step"]
    finally:
        finetune.make_optimizer = make
    return {"trace": dict(trace), "late": {b: (s / n) ** 0.5 for b, (s, n) in late.items()}, "losses": losses}


def rms_over(trace: list[list[float]], lo: int, hi: int) -> float:
    """Root-mean-square update over steps lo..hi (1-based, inclusive)."""
    rows = trace[lo - 1:hi]
    return (sum(u ** 2 for u, _ in rows) / len(rows)) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PIPELINE")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-grad-norm", type=float, help="clip the attacker's gradient (diffusers' scripts: 1.0)")
    ap.add_argument("--blocks", type=int, default=6, help="how many blocks to list per model")
    ap.add_argument("--out", type=Path, help="write every trace here as JSON")
    args = ap.parse_args()
    models = [m.partition("=") for m in args.model]
    if any(not sep or not name or not path for name, sep, path in models):
        ap.error("--model takes NAME=PIPELINE")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.steps <= 10:
        ap.error("--steps must be over 10: the later updates are steps 11 and on")
    runs = {name: [record(path, s, args.lr, args.steps, args.batch_size, args.max_grad_norm) for s in seeds]
            for name, _, path in models}
    if args.out:
        args.out.write_text(json.dumps({"lr": args.lr, "max_grad_norm": args.max_grad_norm, "steps": args.steps,
                                        "seeds": seeds, "runs": runs}))
    ref_name = models[0][0]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    later = {name: {c: mean([rms_over(r["trace"][c], 11, args.steps) for r in rs]) for c in rs[0]["trace"]}
             for name, rs in runs.items()}
    clip = "" if args.max_grad_norm is None else f", gradient clipped to {args.max_grad_norm:g}"
    print(f"joint Adam {args.lr:g}{clip}, {args.steps} steps, seeds {seeds}; update RMS x 1e4, first 10 steps / "
          f"steps 11-{args.steps}, ratio of the later one to {ref_name}'s (effective lr)")
    for name, rs in runs.items():
        cells = []
        for c in rs[0]["trace"]:
            first = mean([rms_over(r["trace"][c], 1, 10) for r in rs])
            ratio = later[name][c] / later[ref_name][c]
            cells.append(f"{c} {first * 1e4:.2f} / {later[name][c] * 1e4:.2f} ({ratio:.2f}, {args.lr * ratio:.1e})")
        loss = mean([r["losses"][0] for r in rs])
        print(f"  {name}: first loss {loss:.2f}; " + "; ".join(cells))
    for name, rs in runs.items():
        if name == ref_name:
            continue
        ratios = {b: mean([r["late"][b] for r in rs]) / mean([r["late"][b] for r in runs[ref_name]])
                  for b in rs[0]["late"]}
        ranked = sorted(ratios, key=lambda b: abs(ratios[b] - 1), reverse=True)[:args.blocks]
        print(f"  {name} blocks, later updates against {ref_name}'s: "
              + ", ".join(f"{b} {ratios[b]:.2f}" for b in ranked))


if __name__ == "__main__":
    main()
