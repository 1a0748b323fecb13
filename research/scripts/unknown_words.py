"""Does the aligned UNet treat words it has never seen as unsafe? (benign fine-tunability)

    python research/scripts/unknown_words.py --unet patronus-tiny-protected [--unet runs/other] [--base patronus-tiny] \
        [--alignment-words]

For benign defender images (noised at random timesteps, fixed seed) it prints, per UNet and per
prompt kind, the denoising loss on the images and how far the prediction moved from the
original UNet's (mean squared difference), for:

  known      the images' own captions (glyph-world words, as in alignment's benign data)
  new-words  the same captions with the object word replaced by "orb", "cube" or "petal" (the
             benign fine-tuning task's words; byte pieces to the tokenizer)
  nonsense   the same captions with the object word replaced by a random letter string
  unsafe     unsafe defender images with their own captions (refused by design)

and with `--alignment-words`, on the UNet half's own benign training images and captions where
alignment's unknown-word term (`unet.w_unknown`, fixed words) put its nonsense word at the
object word:

  alignment's nonsense   those captions with the nonsense words alignment trained on
  fresh nonsense         the same captions with other nonsense words at the object word

A UNet that moved as far on new words and nonsense as on unsafe captions refuses whatever it
cannot read, and a benign fine-tune must first undo that refusal. One that moved little on
alignment's own nonsense words and far on fresh ones memorised the words.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline

from patronus.defenses.patronus.align import UNET_OFFSET, UNKNOWN_SEED, unknown_word_prompts
from patronus.defenses.patronus.bank import PART_START
from patronus.imaging import to_tensor
from patronus.models.components import encode_latents
from patronus.models.registry import resolve_model
from patronus.training import mix_seed
from patronus.world.captions import nonsense_words
from patronus.world.glyphs import CLASS_NAMES, UNSAFE_CLASSES
from patronus.world.newwords import NEW_WORDS
from patronus.world.splits import render_split

START = 4_000_000  # defender-split indices nothing else draws (Patronus's partitions lie below 1.2M, ESD's at 3M)
SEED_OFFSET = 99  # the nonsense words differ from those alignment's `w_unknown` term trains on


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", action="append", required=True, help="pipeline whose UNet to measure (repeatable)")
    ap.add_argument("--base", default="patronus-tiny", help="the original pipeline (its VAE, text encoder, UNet)")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0, help="this script's draws, and the protect run's seed")
    ap.add_argument("--alignment-words", action="store_true",
                    help="add alignment's own nonsense words against fresh ones (fixed-word runs)")
    args = ap.parse_args()
    base = StableDiffusionPipeline.from_pretrained(resolve_model(args.base))
    unets = {name: StableDiffusionPipeline.from_pretrained(resolve_model(name)).unet for name in args.unet}
    tok = base.tokenizer
    vocab = {t.removesuffix("</w>") for t in tok.get_vocab()}
    benign_classes = tuple(c for c in CLASS_NAMES if c not in UNSAFE_CLASSES)
    images, samples = render_split("defender", args.n, base.vae.config.sample_size, start=START, classes=benign_classes)
    unsafe_images, unsafe_samples = render_split("defender", args.n, base.vae.config.sample_size, start=START,
                                                 classes=UNSAFE_CLASSES)
    new = list(NEW_WORDS)
    junk = nonsense_words(args.n, args.seed + SEED_OFFSET, vocab | set(NEW_WORDS))
    prompts = {
        "known": ([s.text for s in samples], images),
        "new-words": ([s.text.replace(s.word, new[i % len(new)]) for i, s in enumerate(samples)], images),
        "nonsense": ([s.text.replace(s.word, junk[i]) for i, s in enumerate(samples)], images),
        "unsafe": ([s.text for s in unsafe_samples], unsafe_images),
    }
    if args.alignment_words:  # the UNet half's 512 benign training captions (align.load_partitions)
        train_images, train = render_split("defender", 512, base.vae.config.sample_size,
                                           start=PART_START["train"] + UNET_OFFSET, classes=benign_classes)
        seen = unknown_word_prompts([s.text for s in train], tok, mix_seed(args.seed, UNKNOWN_SEED))
        at_object = [i for i, (s, p) in enumerate(zip(train, seen)) if s.word not in p.split()]
        fresh = nonsense_words(len(train), args.seed + SEED_OFFSET + 1, vocab | set(NEW_WORDS))
        prompts["alignment's nonsense"] = ([seen[i] for i in at_object], train_images[at_object])
        prompts["fresh nonsense"] = ([train[i].text.replace(train[i].word, fresh[i]) for i in at_object],
                                     train_images[at_object])
    g = torch.Generator().manual_seed(args.seed)
    sched = DDPMScheduler.from_config(base.scheduler.config)  # the training noise schedule
    print(f"{args.n} defender images per kind, one random timestep and noise each (seed {args.seed})")
    print("| UNet | prompts | denoising loss | drift from the original's prediction |")
    print("|---|---|---|---|")
    for kind, (texts, imgs) in prompts.items():
        x0 = encode_latents(base.vae, to_tensor(imgs)) * base.vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=g)
        x_t = sched.add_noise(x0, noise, t)
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        hidden = base.text_encoder(ids)[0]
        original = base.unet(x_t, t, hidden).sample
        rows = [("original", original)] + [(name, unet(x_t, t, hidden).sample) for name, unet in unets.items()]
        for name, pred in rows:
            print(f"| {name} | {kind} | {F.mse_loss(pred, noise).item():.4f} | "
                  f"{F.mse_loss(pred, original).item():.4f} |")


if __name__ == "__main__":
    main()
