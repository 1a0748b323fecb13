"""Write a copy of a filtered pipeline whose text encoder tells the removed words apart.

    python research/scripts/mark_removed_words.py --model patronus-tiny-filtered --out runs/filtered-marked

A filtered text encoder never trains the token rows of the words only the removed captions use;
they keep their initial values, close to every other untrained token (token_geometry.py: the
unsafe words 0.24 apart, a benign fine-tune's new words nearby). A refusal keyed on them is a
refusal of untrained tokens, and a benign LoRA teaching new words runs into it. This script sets
the rows of the *removed words* (the glyph world's caption words that only the unsafe classes use:
every unsafe synonym in SYNONYMS, held-out ones included, since the tokenizer was built on the
unfiltered captions) to one shared direction at the norm of the benign object words' rows. The
three unsafe classes become identical to the encoder (in the filtered model they were 0.24
apart); what changes is that they are no longer where untrained tokens are. No image, and no
encoder weight but those rows, changes; putting the rows' original values back gives back the
filtered pipeline. The rows must be untrained (a filtered encoder): a model whose encoder learned
the words is refused.

It prints the words marked and the rows' norms before and after; `token_geometry.py` on the
output measures where the encoder now puts them.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from patronus.models.registry import resolve_model
from patronus.provenance import library_versions, weight_hashes, weights_digest
from patronus.world.captions import SYNONYMS, TEMPLATES
from patronus.world.glyphs import BACKGROUNDS, COLORS, UNSAFE_CLASSES

UNTRAINED_SHARE = 0.8  # untrained rows keep their initial norm, about 2/3 of a trained word's here


def benign_object_words() -> set[str]:
    return {w for c, ws in SYNONYMS.items() if c not in UNSAFE_CLASSES for w in ws}


def removed_words() -> list[str]:
    """The caption words of the unsafe classes that no benign caption uses."""
    benign = benign_object_words()
    benign |= {w.strip(",.{}") for t in TEMPLATES for w in t.split()} | set(COLORS) | set(BACKGROUNDS)
    return sorted({w for c in UNSAFE_CLASSES for w in SYNONYMS[c]} - benign)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="patronus-tiny-filtered", help="the filtered pipeline")
    ap.add_argument("--out", type=Path, required=True, help="new pipeline directory (must not exist)")
    ap.add_argument("--seed", type=int, default=0, help="draws the shared direction")
    args = ap.parse_args()
    if args.out.exists():
        ap.error(f"{args.out} exists; pick a new --out")
    src = resolve_model(args.model)
    tok = CLIPTokenizer.from_pretrained(src / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(src / "text_encoder")
    rows = encoder.get_input_embeddings().weight
    vocab = tok.get_vocab()
    words = removed_words()
    missing = [w for w in words if f"{w}</w>" not in vocab]
    if missing:
        ap.error(f"not whole-word tokens of {args.model}'s tokenizer: {missing}; this script marks "
                 "whole-word rows only (byte pieces are shared with other words)")
    ids = [vocab[f"{w}</w>"] for w in words]
    benign_ids = [vocab[f"{w}</w>"] for w in sorted(benign_object_words()) if f"{w}</w>" in vocab]
    if not benign_ids:
        ap.error(f"{args.model}'s tokenizer has none of the benign object words as whole-word tokens")
    scale = rows[benign_ids].double().norm(dim=1).mean()  # float64: the same rows at any thread count
    if rows[ids].double().norm(dim=1).mean() > UNTRAINED_SHARE * scale:
        ap.error(f"the removed words' rows of {args.model} look trained (norm near its benign words'); "
                 "this script marks a filtered text encoder, which never learned them")
    g = torch.Generator().manual_seed(args.seed)
    direction = torch.randn(rows.shape[1], generator=g).double()
    before = rows[ids].norm(dim=1)
    rows[ids] = (direction / direction.norm() * scale).to(rows.dtype)
    tmp = args.out.with_name(args.out.name + ".tmp")  # renamed when complete: no half-written --out
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("patronus.json", "README.md"))
    encoder.save_pretrained(tmp / "text_encoder")
    hashes, original = weight_hashes(tmp), weight_hashes(src)
    # the source by weights: a sweep of a model aligned on this one accepts the source as --unprotected
    manifest = {
        "defense": "mark-removed-words (research/scripts/mark_removed_words.py)",
        "source_model": {"path": str(src.resolve()), "weights_sha256": weights_digest(original)},
        "marked_words": words, "seed": args.seed, "row_norm": float(scale),
        "changed_weight_files": sorted(k for k in hashes if hashes[k] != original.get(k)),
        "weight_files_sha256": hashes, "versions": library_versions(),
    }
    (tmp / "patronus.json").write_text(json.dumps(manifest, indent=2))
    tmp.rename(args.out)
    print(f"marked {len(ids)} words: {', '.join(words)}")
    print(f"row norms before {before.mean():.3f} (min {before.min():.3f}, max {before.max():.3f}); "
          f"after {scale:.3f} (the benign object words' mean); one direction, seed {args.seed}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
