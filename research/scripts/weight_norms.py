"""Did protection slow the attacker by rescaling weights? Weight norms, model against model.

    python research/scripts/weight_norms.py --model original=patronus-tiny \
        --model stage1=runs/protected.work/stage1-model --model protected=runs/protected
    python research/scripts/weight_norms.py --component unet --model filtered=patronus-tiny-filtered \
        --model candidate=runs/unet-full-bi-fresh-filtered

Adam moves every weight by about lr per step, so a defence could look robust by inflating
the weights in front of a normalisation layer (the output does not change, the attacker's
relative step shrinks): a trick a white-box attacker undoes in one line by renormalising.
This prints the component's total weight norm per model (the VAE decoder, or the UNet) and, for
each model after the first, its relative distance from the previous model and the layers whose
norm changed most. Ratios near 1 rule the trick out.
"""

from __future__ import annotations

import argparse

from safetensors.torch import load_file

from patronus.models.registry import resolve_model

HEAD = ("decoder.", "post_quant_conv.")
FILES = {"decoder": "vae/diffusion_pytorch_model.safetensors", "unet": "unet/diffusion_pytorch_model.safetensors"}


def weights(model: str, component: str) -> dict:
    """The component's weight matrices and kernels (no biases or norm scales)."""
    state = load_file(resolve_model(model) / FILES[component])
    return {k: v for k, v in state.items()
            if v.ndim >= 2 and (component != "decoder" or k.startswith(HEAD))}


def norm(tensors) -> float:
    """The norm of all `tensors` taken as one vector."""
    return sum(float(v.norm()) ** 2 for v in tensors) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=MODEL",
                    help="a shipped name or pipeline directory; repeat, in order")
    ap.add_argument("--component", choices=sorted(FILES), default="decoder")
    ap.add_argument("--top", type=int, default=3, help="layers to show at each end")
    args = ap.parse_args()
    models = dict(m.split("=", 1) for m in args.model)
    by_model = {name: weights(path, args.component) for name, path in models.items()}
    totals = {name: norm(w.values()) for name, w in by_model.items()}
    names = list(by_model)
    for i, name in enumerate(names):
        w = by_model[name]
        print(f"{name}: {args.component} weight norm {totals[name]:.3f}")
        if i == 0:
            continue
        prev, prev_total = by_model[names[i - 1]], totals[names[i - 1]]
        moved = norm(w[k] - prev[k] for k in w)
        print(f"  norm ratio to {names[i - 1]} {totals[name] / prev_total:.4f}, "
              f"relative distance {moved / prev_total:.4f}")
        ratios = sorted((float(w[k].norm() / prev[k].norm()), k) for k in w)
        shown = ratios[:args.top] + ratios[-args.top:]
        print(f"  per-layer norm ratio to {names[i - 1]}: " + ", ".join(f"{k} {r:.3f}" for r, k in shown))


if __name__ == "__main__":
    main()
