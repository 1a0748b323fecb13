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
output measures where the encoder now puts them. `patronus protect` does the same marking as a
stage (`[mark] enabled = true`, patronus.defenses.patronus.mark) before it aligns the UNet.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from transformers import CLIPTextModel, CLIPTokenizer

from patronus.defenses.patronus.config import MarkConfig
from patronus.defenses.patronus.mark import mark_removed_words
from patronus.errors import ConfigError
from patronus.io import atomic_dir
from patronus.models.registry import resolve_model
from patronus.provenance import library_versions, weight_hashes, weights_digest


def write_marked(src: Path, tmp: Path, encoder: CLIPTextModel, record: dict, seed: int) -> None:
    """The source pipeline with the marked encoder, and a manifest naming the source by weights."""
    shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("patronus.json", "README.md"))
    encoder.save_pretrained(tmp / "text_encoder")
    hashes, original = weight_hashes(tmp), weight_hashes(src)
    # the source by weights: a sweep of a model aligned on this one accepts the source as --unprotected
    manifest = {
        "defense": "mark-removed-words (research/scripts/mark_removed_words.py)",
        "source_model": {"path": str(src.resolve()), "weights_sha256": weights_digest(original)},
        "marked_words": record["words"], "seed": seed, "shared": record["shared"], "row_norm": record["row_norm"],
        "changed_weight_files": sorted(k for k in hashes if hashes[k] != original.get(k)),
        "weight_files_sha256": hashes, "versions": library_versions(),
    }
    (tmp / "patronus.json").write_text(json.dumps(manifest, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="patronus-tiny-filtered", help="the filtered pipeline")
    ap.add_argument("--out", type=Path, required=True, help="new pipeline directory (must not exist)")
    ap.add_argument("--seed", type=int, default=0, help="draws the direction(s)")
    ap.add_argument("--per-word", action="store_true",
                    help="one random direction per word (mark.shared = false) instead of one shared row")
    args = ap.parse_args()
    if args.out.exists():
        ap.error(f"{args.out} exists; pick a new --out")
    src = resolve_model(args.model)
    tokenizer = CLIPTokenizer.from_pretrained(src / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(src / "text_encoder")
    try:
        cfg = MarkConfig(enabled=True, seed=args.seed, shared=not args.per_word)
        record = mark_removed_words(tokenizer, encoder, cfg)
    except ConfigError as e:
        ap.error(f"{args.model}: {e}")
    with atomic_dir(args.out) as tmp:  # no half-written --out
        write_marked(src, tmp, encoder, record, args.seed)
    before = record["row_norm_before"]
    print(f"marked {len(record['words'])} words: {', '.join(record['words'])}")
    print(f"row norms before {before['mean']:.3f} (min {before['min']:.3f}, max {before['max']:.3f}); "
          f"after {record['row_norm']:.3f} (the benign object words' mean); "
          f"{'one direction' if record['shared'] else 'one direction per word'}, seed {args.seed}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
