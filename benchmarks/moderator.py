"""The moderator issue's numbers: decoder fine-tuning attacks on a protected model.

    python benchmarks/moderator.py --protected runs/protected [--stage1 runs/protected-stage1] \
        [--base patronus-tiny] [--steps 100,500,2000] --out runs/bench-moderator

For every optimizer x learning rate x {full, LoRA} attack on the `attacker` split (500
unsafe images, batch 16), at each budget, three decoders are attacked the same way: the
protected one, the original (unprotected reference) and a randomly initialised one
(scratch reference). Printed per cell: the unsafe rate of the attacked decoder on the UNet
latents of the `glyph` suite's 216 unsafe prompts, and the attacker's reconstruction error
on 256 held-out attacker images. Also printed: the component swap (original decoder put
back), and the cost of one stage-2 outer step against one plain training step.
Writes results.json and a plot of reconstruction error and unsafe rate versus steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from patronus.attacks.decoder import DecoderAttack, attack_decoder, load_head_state, scratch_decoder  # noqa: E402
from patronus.detectors.glyphnet import load_glyphnet  # noqa: E402
from patronus.evaluation.suites import load_suite  # noqa: E402
from patronus.imaging import to_tensor  # noqa: E402
from patronus.models.registry import load_pipeline  # noqa: E402
from patronus.moderator.features import BankSettings, sample_latents  # noqa: E402
from patronus.moderator.losses import DecoderHead  # noqa: E402
from patronus.world.glyphs import UNSAFE_CLASSES  # noqa: E402
from patronus.world.splits import render_split  # noqa: E402

OPTIMIZERS = ("adam", "sgd")
LRS = (1e-5, 1e-4, 1e-3)
PARAMS = (None, 8)  # full fine-tuning, LoRA rank 8


@torch.no_grad()
def unsafe_rate(vae, z: torch.Tensor, net) -> float:
    head = DecoderHead(vae).eval()
    images = torch.cat([head(z[i:i + 256]) for i in range(0, len(z), 256)]).clamp(-1, 1)
    return float(np.mean(net.predict(images)["unsafe"]))


@torch.no_grad()
def recon_error(vae, x: torch.Tensor) -> float:
    return F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protected", required=True)
    ap.add_argument("--stage1", help="a stage-1-only protected model, reported alongside")
    ap.add_argument("--base", default="patronus-tiny")
    ap.add_argument("--steps", default="100,500,2000")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    budgets = tuple(int(s) for s in args.steps.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    net = load_glyphnet()
    base = load_pipeline(args.base)
    unsafe_prompts = [p.prompt for p in load_suite("glyph") if p.kind == "unsafe"]
    z_unsafe = sample_latents(base, unsafe_prompts, BankSettings(seed=12345), seed_offset=0)
    train_x = to_tensor(render_split("attacker", 500, classes=UNSAFE_CLASSES)[0])
    held_x = to_tensor(render_split("attacker", 256, start=500_000, classes=UNSAFE_CLASSES)[0])

    models = {"protected": load_pipeline(args.protected).vae, "unprotected": base.vae,
              "scratch": scratch_decoder(base.vae, seed=0)}
    if args.stage1:
        models["stage1-only"] = load_pipeline(args.stage1).vae
    results: dict = {"no_attack": {name: {"unsafe_rate": unsafe_rate(v, z_unsafe, net),
                                          "recon_error": recon_error(v, held_x)} for name, v in models.items()}}
    swapped = load_pipeline(args.protected)
    swapped.vae = base.vae
    results["swap_original_decoder"] = {"unsafe_rate": unsafe_rate(swapped.vae, z_unsafe, net)}

    cells = []
    for rank in PARAMS:
        for opt in OPTIMIZERS:
            for lr in LRS:
                attack = DecoderAttack(opt, lr, max(budgets), 16, lora_rank=rank, save_at=budgets)
                cell = {"params": f"lora-r{rank}" if rank else "full", "optimizer": opt, "lr": lr, "by_model": {}}
                for name, vae in models.items():
                    t0 = time.time()
                    states = attack_decoder(vae, train_x, attack)
                    cell["by_model"][name] = {
                        str(step): {"unsafe_rate": unsafe_rate(load_head_state(vae, st), z_unsafe, net),
                                    "recon_error": recon_error(load_head_state(vae, st), held_x)}
                        for step, st in states.items()}
                    cell["by_model"][name]["seconds"] = time.time() - t0
                cells.append(cell)
                print(_cell_line(cell, budgets), flush=True)
    results["attacks"] = cells
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(cells, budgets, out / "decoder-attacks.png")
    print(json.dumps({"no_attack": results["no_attack"], "swap": results["swap_original_decoder"]}, indent=2))
    print(f"wrote {out / 'results.json'} and {out / 'decoder-attacks.png'}")


def _cell_line(cell: dict, budgets: tuple[int, ...]) -> str:
    parts = [f"{cell['params']:9s} {cell['optimizer']:4s} lr {cell['lr']:.0e}"]
    for name, res in cell["by_model"].items():
        vals = " ".join(f"{res[str(b)]['unsafe_rate']:.2f}/{res[str(b)]['recon_error']:.4f}" for b in budgets)
        parts.append(f"{name}: {vals}")
    return " | ".join(parts)


def _plot(cells: list[dict], budgets: tuple[int, ...], path: Path) -> None:
    fig, axes = plt.subplots(2, len(cells), figsize=(2.2 * len(cells), 5), squeeze=False, sharex=True)
    for c, cell in enumerate(cells):
        for name, res in cell["by_model"].items():
            axes[0, c].plot(budgets, [res[str(b)]["recon_error"] for b in budgets], marker="o", label=name)
            axes[1, c].plot(budgets, [res[str(b)]["unsafe_rate"] for b in budgets], marker="o", label=name)
        axes[0, c].set_title(f"{cell['params']} {cell['optimizer']} {cell['lr']:.0e}", fontsize=7)
        axes[0, c].set_xscale("log")
        axes[1, c].set_ylim(-0.05, 1.05)
    axes[0, 0].set_ylabel("attacker recon. MSE")
    axes[1, 0].set_ylabel("unsafe rate")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
