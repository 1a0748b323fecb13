"""Does an aligned UNet *draw* words it cannot read as its base model does, beyond the ones it saw?

    python research/scripts/nonsense_samples.py runs/unet-full-bi-filtered --base patronus-tiny-filtered [--n 128]

The UNet half's unknown-word term (`unet.w_unknown`) distils benign captions with one word
replaced by a nonsense word to the base model: one fixed nonsense word per training caption
(`unknown_word_prompts`, seeded). A benign fine-tune that teaches a new word starts from the
model's answer to that word, so the term helps only if it generalises to words it never saw.
This script samples both models with the same seeds on the defender's own captions (never the
`new-words` task's) in three forms: as they are; with the nonsense words alignment trained on;
with fresh nonsense words in the same captions. It prints, per form, how often GlyphNet names
the same class for both models' images and their mean PSNR. (research/scripts/unknown_words.py
measures the same question teacher-forced, on the denoising loss at noised images.)
"""

from __future__ import annotations

import argparse

import numpy as np

from patronus.defenses.patronus.align import UNET_OFFSET, UNKNOWN_SEED, unknown_word_prompts
from patronus.defenses.patronus.bank import PART_START
from patronus.detectors.glyphnet import GlyphNetDetector
from patronus.evaluation.metrics import psnr_uint8
from patronus.models.registry import load_pipeline
from patronus.models.sampling import generate
from patronus.training import mix_seed
from patronus.world import CLASS_NAMES, UNSAFE_CLASSES, render_split

FRESH_SEED = 777  # any seed but the one alignment used gives other nonsense words


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="the aligned model")
    ap.add_argument("--base", required=True, help="the model it was aligned from (its teacher)")
    ap.add_argument("--n", type=int, default=128, help="captions per form (the first n of alignment's benign ones)")
    ap.add_argument("--seed", type=int, default=0, help="the protect run's seed (which nonsense words it drew)")
    args = ap.parse_args()
    if args.n < 1:
        ap.error("--n must be at least 1")
    model, base = load_pipeline(args.model), load_pipeline(args.base)
    for pipe in (model, base):
        pipe.set_progress_bar_config(disable=True)
    benign = tuple(c for c in CLASS_NAMES if c not in UNSAFE_CLASSES)
    _, samples = render_split("defender", args.n, 32, start=PART_START["train"] + UNET_OFFSET, classes=benign)
    texts = [s.text for s in samples]
    forms = {
        "benign captions": texts,
        "nonsense words alignment saw": unknown_word_prompts(texts, base.tokenizer, mix_seed(args.seed, UNKNOWN_SEED)),
        "fresh nonsense words": unknown_word_prompts(texts, base.tokenizer, mix_seed(args.seed, FRESH_SEED)),
    }
    detector = GlyphNetDetector()
    seeds = list(range(args.n))
    print(f"{args.model} against {args.base}, {args.n} captions per form, the same seeds:")
    for name, prompts in forms.items():
        a, b = generate(model, prompts, seeds), generate(base, prompts, seeds)
        same = np.mean([x["class"] == y["class"] for x, y in zip(detector.detect(a), detector.detect(b))])
        print(f"  {name:30s} same class {100 * same:5.1f}%   PSNR {psnr_uint8(a, b).mean():5.1f} dB"
              f"   e.g. {prompts[0]!r}")


if __name__ == "__main__":
    main()
