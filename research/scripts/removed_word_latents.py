"""What does a UNet draw for the removed words, and could a decoder tell it from a benign drawing?

    python research/scripts/removed_word_latents.py --model runs/filtered-marked --model patronus-tiny-filtered --n 512

A refusal that lives in the decoder alone keeps the filtered UNet bit for bit, so the UNet cells
of the decision grid stay the filtered model's. It can only work if the latents that UNet draws
for unsafe prompts differ from those it draws for benign ones: the decoder sees nothing else. For
each model and prompt group (unsafe, hard negatives, benign) it prints the GlyphNet classes of the
decodings and how many GlyphNet flags, then two classifiers of the latents, unsafe against benign
and hard negatives (70% to fit, 30% held out): a logistic regression and a one-hidden-layer MLP,
with held-out accuracy (always answering "benign" scores 66.7%), true and false positive rates.
A probe is a rough bound on what a decoder could separate; the class histogram says what the
separation would have to tell apart.
"""

from __future__ import annotations

import argparse
import collections

import torch

from patronus.defenses.patronus.bank import FeatureBankConfig, sample_latents
from patronus.detectors import detect_decoded, make_detector
from patronus.models.registry import load_pipeline
from patronus.world.glyphs import CLASS_NAMES, HARD_NEGATIVES, UNSAFE_CLASSES
from patronus.world.splits import render_split

START = 4_300_000  # defender-split indices nothing else draws (token_geometry.py uses 4,200,000 on)
GROUPS = {"unsafe": UNSAFE_CLASSES, "hard": HARD_NEGATIVES,
          "benign": tuple(c for c in CLASS_NAMES if c not in UNSAFE_CLASSES + HARD_NEGATIVES)}


@torch.no_grad()
def latents_by_group(model: str, n: int, steps: int, guidance: float) -> dict[str, torch.Tensor]:
    pipe = load_pipeline(model)
    detector = make_detector("glyphnet")
    settings = FeatureBankConfig(sampler_steps=steps, guidance=guidance)  # latents as the decoder's bank samples them
    out = {}
    for group, classes in GROUPS.items():
        _, samples = render_split("defender", n, start=START, classes=classes)
        z = sample_latents(pipe, [s.text for s in samples], settings, seed_offset=0)
        found = detect_decoded(detector, pipe.vae.decode(z, return_dict=False)[0].clamp(-1, 1))
        classes_drawn = collections.Counter(r["class"] for r in found).most_common(5)
        flagged = sum(bool(r["unsafe"]) for r in found) / n
        print(f"{model}  {group:6s}  flagged {flagged:6.1%}  drawn: "
              + ", ".join(f"{c} {k / n:.0%}" for c, k in classes_drawn), flush=True)
        out[group] = z
    return out


def probe(pos: torch.Tensor, neg: torch.Tensor, hidden: int = 0, seed: int = 0) -> tuple[float, float, float]:
    """Held-out (accuracy, true positive rate, false positive rate) of a classifier of the latents:
    L2-regularised logistic regression (`hidden` 0) or one hidden ReLU layer of `hidden` units."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([pos, neg]).flatten(1)
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    order = torch.randperm(len(x), generator=g)
    x, y = x[order], y[order]
    k = int(0.7 * len(x))
    x = (x - x[:k].mean(0)) / (x[:k].std(0) + 1e-6)
    torch.manual_seed(seed)
    net = (torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
           if hidden else torch.nn.Linear(x.shape[1], 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2 if not hidden else 1e-3, weight_decay=1e-3)
    for _ in range(500 if not hidden else 2000):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(net(x[:k]).squeeze(1), y[:k]).backward()
        opt.step()
    with torch.no_grad():
        pred, truth = net(x[k:]).squeeze(1) > 0, y[k:].bool()
    return ((pred == truth).float().mean().item(), (pred & truth).sum().item() / truth.sum().item(),
            (pred & ~truth).sum().item() / (~truth).sum().item())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--n", type=int, default=256, help="prompts per group")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--hidden", type=int, default=256, help="hidden units of the second probe")
    args = p.parse_args()
    for model in args.model:
        z = latents_by_group(model, args.n, args.steps, args.guidance)
        for name, hidden in (("linear probe", 0), (f"MLP probe ({args.hidden} hidden)", args.hidden)):
            acc, tpr, fpr = probe(z["unsafe"], torch.cat([z["hard"], z["benign"]]), hidden)
            print(f"{model}  {name}, unsafe vs benign + hard: accuracy {acc:.1%}, "
                  f"true positives {tpr:.1%}, false positives {fpr:.1%}", flush=True)


if __name__ == "__main__":
    main()
