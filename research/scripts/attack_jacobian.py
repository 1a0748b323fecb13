"""Does a step along the first-order NFT gradient lower the query loss where a real attack ends?

    python research/scripts/attack_jacobian.py runs/unet-med-full.work/unet/stage1-unet.safetensors

First-order MAML (`patronus.nft.maml.simulate_first_order`) takes the query gradient g at the
end point A(w) of a simulated attack and applies it to the weights w, as if A(w + d) = A(w) + d.
This benchmark tests that assumption on real attacks. It loads `patronus-tiny` with the given
UNet, attacks a full-weight copy (the defender's unsafe training images, batch 16, fixed
batches and noise per seed) and measures the query loss q at the end (one fixed held-out
batch, the UNet half's query loss), averaged over `--seeds` attack seeds. Then it moves the
weights by d = -eta |w| g / |g|, a defender's step downhill by first-order MAML's reckoning,
replays the same attacks from w + d, and prints:

- predicted: g . d, the change of q at the end point that first-order MAML assumes (g averaged
  over the seeds, as many outer steps of NFT average it);
- actual: the mean of q(A(w + d)) - q(A(w));
- moved: |A(w + d) - A(w) - d| / |d|, how far the end point's shift is from the defender's
  own step (0: the attack carries the step along unchanged, as first-order MAML assumes).

The no-attack row (0 steps) checks that q is close to linear at that step size.
"""

from __future__ import annotations

import torch
from attacker_curvature import load_unet_half, unet_half_parser  # this folder: run as a script

from patronus.defenses.patronus.align import Aligner
from patronus.training import make_optimizer

Params = dict[str, torch.Tensor]


def attack(a: Aligner, start: Params, optimizer: str, lr: float, steps: int, batch: int, seed: int) -> Params:
    """A full-weight fine-tune of a copy of `start`, the same batches and noise for every start."""
    fast = {n: p.clone().requires_grad_(True) for n, p in start.items()}
    opt = make_optimizer(optimizer, lr, list(fast.values()))
    inner, g = a.inner_loss_fn(batch), torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = inner(fast, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {n: p.detach() for n, p in fast.items()}


def norm(x: Params) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in x.values())))


def main() -> None:
    ap = unet_half_parser(__doc__)
    ap.add_argument("--attacks", default="adam:1e-4:0,adam:1e-4:10,adam:1e-4:100,adam:1e-3:10,adam:1e-3:100,"
                                         "sgd:1e-3:10,sgd:1e-3:100",
                    help="optimizer:lr:steps, comma-separated")
    ap.add_argument("--etas", default="1e-4,1e-3", help="defender step sizes, relative to |w|")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=1, help="attack seeds (batches and noise) to average over")
    args = ap.parse_args()
    a = load_unet_half(args)
    w = {n: p.detach().clone() for n, p in a.unet.named_parameters()}
    query = a.query_loss_fn(torch.Generator().manual_seed(1))
    print("| attack | eta | q at the end | predicted change | actual change | actual / predicted | moved |\n"
          "|---|---|---|---|---|---|---|")
    for spec in args.attacks.split(","):
        optimizer, lr, steps = spec.split(":")
        ends, qs, gs = [], [], []
        for seed in range(args.seeds):
            ends.append(attack(a, w, optimizer, float(lr), int(steps), args.batch, seed))
            p = {n: v.clone().requires_grad_(True) for n, v in ends[-1].items()}
            qs.append(query(p))
            gs.append(dict(zip(p, torch.autograd.grad(qs[-1], list(p.values())))))
        g = {n: sum(x[n] for x in gs) / args.seeds for n in w}  # first-order MAML's gradient, seed-averaged
        for eta in (float(x) for x in args.etas.split(",")):
            scale = eta * norm(w) / norm(g)
            d = {n: -scale * g[n] for n in w}
            actual, moved = 0.0, 0.0
            for seed in range(args.seeds):
                end2 = attack(a, {n: w[n] + d[n] for n in w}, optimizer, float(lr), int(steps), args.batch, seed)
                with torch.no_grad():
                    actual += float(query(end2) - qs[seed]) / args.seeds
                moved += norm({n: end2[n] - ends[seed][n] - d[n] for n in w}) / norm(d) / args.seeds
            predicted = float(sum((g[n] * d[n]).sum() for n in w))
            q = sum(float(x) for x in qs) / args.seeds
            print(f"| {optimizer} {lr}, {steps} steps | {eta:g} | {q:.4f} | {predicted:+.2e} | {actual:+.2e} | "
                  f"{actual / predicted:+.2f} | {moved:.2f} |", flush=True)


if __name__ == "__main__":
    main()
