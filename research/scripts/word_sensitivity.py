"""How much does a UNet's prediction depend on which word stands in a caption's object slot?

    python research/scripts/word_sensitivity.py --unet runs/unet-full-bi-fresh-filtered \
        [--unet runs/other] --base patronus-tiny-filtered

A benign LoRA that teaches "orb" (circle) must make the UNet draw differently for that word
than for others it cannot read. An alignment whose unknown-word term holds the UNet to the
original on captions with random nonsense words can meet that term by not reading such words
at all, which would leave the LoRA a UNet deaf to exactly what it has to learn. For benign
defender images (noised at one random timestep each, fixed seed, the same for every UNet) it
prints the mean squared difference between the UNet's predictions for the same noised image
under two captions that differ only in the object word, over every pair of words in a set:

  known      the classes' own words (circle, square, flower)
  new        the benign fine-tuning task's words (orb, cube, petal; byte pieces to the tokenizer)
  nonsense   three random letter strings (byte pieces too)
  new-known  each new word against the class it names (orb-circle, ...): what a LoRA must close

A UNet reads a set of words as much as its pairs' differences are large; their ratio to the
original's (the base UNet, same text encoder) says how much of that an alignment kept.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline

from patronus.imaging import to_tensor
from patronus.models.components import encode_latents
from patronus.models.registry import resolve_model
from patronus.world.captions import nonsense_words
from patronus.world.glyphs import CLASS_NAMES, UNSAFE_CLASSES
from patronus.world.newwords import NEW_WORDS
from patronus.world.splits import render_split

START = 4_100_000  # defender-split indices nothing else draws (unknown_words.py uses 4,000,000 on)
SEED_OFFSET = 77  # nonsense words other than alignment's and unknown_words.py's


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", action="append", required=True, help="pipeline whose UNet to measure (repeatable)")
    ap.add_argument("--base", default="patronus-tiny-filtered",
                    help="the original pipeline (its VAE, text encoder, UNet)")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    base = StableDiffusionPipeline.from_pretrained(resolve_model(args.base))
    unets = {"original": base.unet} | {name: StableDiffusionPipeline.from_pretrained(resolve_model(name)).unet
                                       for name in args.unet}
    tok = base.tokenizer
    vocab = {t.removesuffix("</w>") for t in tok.get_vocab()}
    benign_classes = tuple(c for c in CLASS_NAMES if c not in UNSAFE_CLASSES)
    images, samples = render_split("defender", args.n, base.vae.config.sample_size, start=START, classes=benign_classes)
    sets = {"known": list(NEW_WORDS.values()), "new": list(NEW_WORDS),
            "nonsense": nonsense_words(3, args.seed + SEED_OFFSET, vocab | set(NEW_WORDS))}
    pairs = {name: list(itertools.combinations(words, 2)) for name, words in sets.items()}
    pairs["new-known"] = list(NEW_WORDS.items())
    words = sorted({w for ws in sets.values() for w in ws})

    g = torch.Generator().manual_seed(args.seed)
    sched = DDPMScheduler.from_config(base.scheduler.config)
    x0 = encode_latents(base.vae, to_tensor(images)) * base.vae.config.scaling_factor
    t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=g)
    x_t = sched.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    hidden = {}
    for w in words:
        ids = tok([s.text.replace(s.word, w) for s in samples], padding="max_length",
                  max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        hidden[w] = base.text_encoder(ids)[0]
    print(f"{args.n} benign defender images, one random timestep and noise each (seed {args.seed}); "
          f"nonsense words {', '.join(sets['nonsense'])}")
    print("| UNet | " + " | ".join(pairs) + " |")
    print("|---|" + "---|" * len(pairs))
    table = {}
    for name, unet in unets.items():
        pred = {w: unet(x_t, t, hidden[w]).sample for w in words}
        table[name] = {k: sum(F.mse_loss(pred[a], pred[b]).item() for a, b in ps) / len(ps) for k, ps in pairs.items()}
        print(f"| {name} | " + " | ".join(f"{v:.5f}" for v in table[name].values()) + " |")
    print("\nas a share of the original's:")
    for name in args.unet:
        print(f"| {name} | " + " | ".join(f"{table[name][k] / table['original'][k]:.2f}" for k in pairs) + " |")


if __name__ == "__main__":
    main()
