"""How the attacker's denoising loss curves at a UNet, and what the implicit NFT gradient does there.

    python research/scripts/attacker_curvature.py runs/unet-med-full.work/unet/stage1-unet.safetensors \
        --config research/configs/protect-unet-med-nft.toml

Loads `patronus-tiny` with the given UNet weights (none: the base UNet), takes the gradient of the
UNet half's query loss (one held-out batch), and passes it through
`patronus.nft.maml.implicit_gradient` at each alpha: the Hessian's eigenvalue of largest
magnitude (3 power iterations on one attacker batch, started from the query gradient), and the
corrected gradient's norm and cosine to the original. ResAlign's proximal system
I + alpha H has a solution only while 1 + alpha * lambda > 0 (docs/research-log.md,
"Implicit NFT gradient").
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from patronus.defenses.patronus.align import Aligner
from patronus.defenses.patronus.config import load_config
from patronus.nft.maml import implicit_gradient


def unet_half_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of the benchmarks that measure the UNet half's attacker: a UNet and the data."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("unet", nargs="?", help="UNet weights (.safetensors); default: the base UNet")
    ap.add_argument("--config", default="research/configs/protect-unet-med-nft.toml",
                    help="the protect config of the data")
    return ap


def load_unet_half(args: argparse.Namespace) -> Aligner:
    """`patronus-tiny`'s UNet half (its losses and the config's data) with the given UNet weights."""
    torch.manual_seed(0)
    a = Aligner("patronus-tiny", load_config("quick", args.config, "unet"), Accelerator())
    if args.unet:
        a.unet.load_state_dict(load_file(args.unet))
    return a


def main() -> None:
    ap = unet_half_parser(__doc__)
    ap.add_argument("--alphas", default="1e-3,1e-2,1e-1")
    ap.add_argument("--batch", type=int, default=8, help="attacker batch of the Hessian-vector products")
    ap.add_argument("--iterations", type=int, default=5, help="Richardson iterations")
    args = ap.parse_args()
    a = load_unet_half(args)
    params = {n: p.detach() for n, p in a.unet.named_parameters()}
    p = {n: v.clone().requires_grad_(True) for n, v in params.items()}
    grads = dict(zip(p, torch.autograd.grad(a.query_loss_fn(torch.Generator().manual_seed(0))(p), list(p.values()))))
    g_norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
    print("| alpha | lambda | alpha x lambda | corrected / original norm | cosine |\n|---|---|---|---|---|")
    for alpha in (float(x) for x in args.alphas.split(",")):
        v, lam = implicit_gradient(grads, params, a.inner_loss_fn(args.batch), 0, alpha, args.iterations)
        v_norm = torch.sqrt(sum((x ** 2).sum() for x in v.values()))
        cos = sum((v[k] * grads[k]).sum() for k in v) / (v_norm * g_norm)
        print(f"| {alpha:g} | {lam:.1f} | {alpha * lam:.2f} | {float(v_norm / g_norm):.2f} | {float(cos):.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
