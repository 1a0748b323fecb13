"""Where does a text encoder put the unsafe words, relative to words no caption taught it?

    python research/scripts/token_geometry.py --model patronus-tiny-filtered --model patronus-tiny

A refusal keyed on the unsafe words can only be as specific as the text encoder lets it be. A
filtered text encoder never trained the unsafe words' token rows; a benign fine-tune's new words
("orb", "cube", "petal") are byte pieces no caption trained in any glyph-world encoder. If both
sit where untrained tokens sit, a refusal of the one lies on the path a LoRA must take to teach
the other. For each pipeline's text encoder it prints:

  norm      the mean norm of the token rows of a set's words in the input embedding (an untrained
            row keeps its initial norm, about 0.16 here; a trained one grows)
  distance  for benign defender captions (fixed seed) with the object word replaced by each word
            of two sets, the mean relative distance ||e(a) - e(b)|| / ||e(a)|| of the encoder's
            last hidden states over all positions (no attention mask, as the UNet reads them),
            over every caption and pair of words

Sets: unsafe (knife, gun, blood), new (orb, cube, petal), nonsense (three random letter strings),
known (circle, square, flower).
"""

from __future__ import annotations

import argparse
import itertools

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from patronus.models.registry import resolve_model
from patronus.world.captions import SYNONYMS, nonsense_words
from patronus.world.glyphs import UNSAFE_CLASSES
from patronus.world.newwords import NEW_WORDS
from patronus.world.splits import sample

START = 4_200_000  # defender-split indices nothing else draws (word_sensitivity.py uses 4,100,000 on)
SEED_OFFSET = 91  # nonsense words other than alignment's and the other scripts'


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="pipeline to measure (repeatable)")
    ap.add_argument("--n", type=int, default=64, help="captions per word")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sets = {"unsafe": [SYNONYMS[c][0] for c in UNSAFE_CLASSES], "new": list(NEW_WORDS),
            "known": list(NEW_WORDS.values())}
    benign = tuple(NEW_WORDS.values())
    samples = [sample("defender", START + i, benign) for i in range(args.n)]
    groups = [("unsafe", "unsafe"), ("new", "new"), ("nonsense", "nonsense"), ("known", "known"),
              ("unsafe", "new"), ("unsafe", "nonsense"), ("new", "nonsense"), ("unsafe", "known"), ("new", "known")]
    print(f"{args.n} benign defender captions per word")
    print("| text encoder | " + " | ".join(f"norm {s}" for s in [*sets, "nonsense"]) + " | "
          + " | ".join(f"{a}-{b}" for a, b in groups) + " |")
    print("|---|" + "---|" * (len(sets) + 1 + len(groups)))
    drawn = {}
    for name in args.model:
        path = resolve_model(name)
        tok = CLIPTokenizer.from_pretrained(path / "tokenizer")
        encoder = CLIPTextModel.from_pretrained(path / "text_encoder").eval()
        vocab = {t.removesuffix("</w>") for t in tok.get_vocab()}
        words = sets | {"nonsense": nonsense_words(3, args.seed + SEED_OFFSET, vocab | set(NEW_WORDS))}
        drawn[name] = words["nonsense"]
        rows = encoder.get_input_embeddings().weight
        norms = {s: torch.cat([rows[tok(w, add_special_tokens=False).input_ids] for w in ws]).norm(dim=1).mean().item()
                 for s, ws in words.items()}
        hidden = {}
        for w in sorted({w for ws in words.values() for w in ws}):
            ids = tok([s.text.replace(s.word, w) for s in samples], padding="max_length",
                      max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            hidden[w] = encoder(ids).last_hidden_state.flatten(1)

        def distance(a: str, b: str) -> float:
            pairs = itertools.combinations(words[a], 2) if a == b else itertools.product(words[a], words[b])
            d = [((hidden[x] - hidden[y]).norm(dim=1) / hidden[x].norm(dim=1)).mean().item() for x, y in pairs]
            return sum(d) / len(d)

        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in norms.values()) + " | "
              + " | ".join(f"{distance(a, b):.2f}" for a, b in groups) + " |")
    for name, nonsense in drawn.items():
        print(f"nonsense words ({name}, --seed {args.seed}): {', '.join(nonsense)}")


if __name__ == "__main__":
    main()
