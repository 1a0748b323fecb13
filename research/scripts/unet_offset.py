"""Is it the refusal, or any move of that size? UNets at a chosen offset from a base UNet.

    python research/scripts/unet_offset.py --base patronus-tiny-filtered \
        --model runs/unet-full-er-plain-gamma10-long-filtered --scale -1 --out runs/diag-filtered-minus-refusal-delta
    python research/scripts/unet_offset.py --base patronus-tiny-filtered \
        --model runs/unet-full-er-plain-gamma10-long-filtered --random 0 --out runs/diag-filtered-plus-random-delta

Every refusal learned on top of the filtered UNet gives the lr 1e-3 attacker a few points over
the filtered model. Writes a pipeline directory that is `--model` with its UNet replaced by
base + scale * (model - base) (`--scale -1`: the refusal's mirror image, which an Adam attack
that overshoots the filtered point on its way out of the refusal would pass through), or, with
`--random SEED`, base + a Gaussian offset whose norm matches (model - base) tensor by tensor
(a move of the same size in no particular direction), in --model's precision. The sweeps then
attack it as any model. --model's patronus.json is left behind: its weight hashes and records
describe --model, not the diagnostic.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from patronus.models.registry import resolve_model

UNET = "unet/diffusion_pytorch_model.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the UNet the offset starts from (a model name or directory)")
    ap.add_argument("--model", required=True, help="the model whose change from --base sets the offset")
    ap.add_argument("--scale", type=float, default=None, help="base + scale * (model - base)")
    ap.add_argument("--random", type=int, default=None, metavar="SEED",
                    help="base + a Gaussian offset of the same norm as (model - base), tensor by tensor")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    if (args.scale is None) == (args.random is None):
        ap.error("give exactly one of --scale and --random")
    if args.out.exists():
        ap.error(f"{args.out} exists; choose another --out")
    base_dir, model_dir = resolve_model(args.base), resolve_model(args.model)
    base, model = load_file(base_dir / UNET), load_file(model_dir / UNET)
    if base.keys() != model.keys() or any(base[k].shape != model[k].shape for k in base):
        ap.error(f"{args.base} and {args.model} have UNets of different shapes")
    g = torch.Generator().manual_seed(args.random or 0)
    out = {}
    for k in sorted(base):
        b, m = base[k].float(), model[k].float()
        if args.scale is not None:
            out[k] = ((1 - args.scale) * b + args.scale * m).to(model[k].dtype)
            continue
        delta, noise = m - b, torch.randn(b.shape, generator=g)
        out[k] = (b + noise * (delta.norm() / noise.norm()) if delta.norm() > 0 else b).to(model[k].dtype)
    shift = sum(float((out[k].float() - base[k].float()).norm() ** 2) for k in base) ** 0.5
    size = sum(float(base[k].float().norm() ** 2) for k in base) ** 0.5
    shutil.copytree(model_dir, args.out, ignore=shutil.ignore_patterns("patronus.json"))
    save_file({k: v.contiguous() for k, v in out.items()}, args.out / UNET)
    how = f"scale {args.scale:g}" if args.scale is not None else f"random direction, seed {args.random}"
    (args.out / "README.md").write_text(
        f"A diagnostic, not a model: {args.model} with its UNet at {args.base}'s plus an offset ({how}) of "
        f"its change from {args.base}; written by research/scripts/unet_offset.py.\n")
    print(f"wrote {args.out}: UNet offset from {args.base} {shift / size:.4f} of its norm ({how})")


if __name__ == "__main__":
    main()
