"""Did protection slow the attacker by rescaling weights? Decoder weight norms, model against model.

    python research/scripts/weight_norms.py --model original=patronus-tiny \
        --model stage1=runs/protected.work/stage1-model --model protected=runs/protected

Adam moves every weight by about lr per step, so a defence could look robust by inflating
the weights in front of a normalisation layer (the output does not change, the attacker's
relative step shrinks): a trick a white-box attacker undoes in one line by renormalising.
This prints the decoder's total weight norm per model and, for each model after the first,
the layers whose norm changed most relative to the previous model. Ratios near 1 rule the
trick out.
"""

from __future__ import annotations

import argparse

from safetensors.torch import load_file

from patronus.models.registry import resolve_model

HEAD = ("decoder.", "post_quant_conv.")


def decoder_weights(model: str) -> dict:
    """The decoder head's weight matrices and kernels (no biases or norm scales)."""
    state = load_file(resolve_model(model) / "vae" / "diffusion_pytorch_model.safetensors")
    return {k: v for k, v in state.items() if k.startswith(HEAD) and v.ndim >= 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=MODEL",
                    help="a shipped name or pipeline directory; repeat, in order")
    ap.add_argument("--top", type=int, default=3, help="layers to show at each end")
    args = ap.parse_args()
    models = dict(m.split("=", 1) for m in args.model)
    weights = {name: decoder_weights(path) for name, path in models.items()}
    names = list(weights)
    for i, name in enumerate(names):
        w = weights[name]
        total = sum(float(v.norm()) ** 2 for v in w.values()) ** 0.5
        print(f"{name}: decoder weight norm {total:.3f}")
        if i == 0:
            continue
        prev = weights[names[i - 1]]
        ratios = sorted((float(w[k].norm() / prev[k].norm()), k) for k in w)
        shown = ratios[:args.top] + ratios[-args.top:]
        print(f"  per-layer norm ratio to {names[i - 1]}: " + ", ".join(f"{k} {r:.3f}" for r, k in shown))


if __name__ == "__main__":
    main()
