"""The `[mark]` stage of `patronus protect`: the removed words' text-encoder rows, told apart.

A text encoder trained on filtered data never trains the token rows of the words only the
removed captions use: they keep their initial values, next to every other untrained token (a
benign fine-tune's new words among them). The stage sets those rows to one shared random
direction (with `shared = false`, one random direction per word, optionally mixed with a
common one: `shared_share`) at the mean norm of trained
words' rows, so that the UNet half's refusal keys on words that no longer look untrained.
Nothing else changes: no image is involved, and the encoder learns nothing of what the words
depict (their rows are random). `MarkConfig` says why.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from patronus.defenses.patronus.config import MarkConfig
from patronus.errors import ConfigError
from patronus.world.captions import benign_object_words, removed_words

# Untrained rows keep their initial norm, about 2/3 of a trained word's in the glyph world's encoders.
UNTRAINED_SHARE = 0.8


def _whole_word_ids(tokenizer: CLIPTokenizer, words: tuple[str, ...] | list[str], what: str) -> list[int]:
    vocab = tokenizer.get_vocab()
    if missing := [w for w in words if f"{w}</w>" not in vocab]:
        raise ConfigError(f"{what} not whole-word tokens of the model's tokenizer: {', '.join(missing)}; only "
                          f"whole-word rows can be marked (a word's byte pieces are shared with other words)")
    return [vocab[f"{w}</w>"] for w in words]


@torch.no_grad()
def mark_removed_words(tokenizer: CLIPTokenizer, encoder: CLIPTextModel, cfg: MarkConfig) -> dict:
    """Set the rows of `cfg.words` (default: the glyph world's removed words) in place; returns the
    record for patronus.json. Refuses, before changing anything, words that are not whole-word
    tokens and rows that look trained (their mean norm near the norm words')."""
    words = list(cfg.words) or removed_words()
    norm_words = list(cfg.norm_words) or benign_object_words()
    ids = _whole_word_ids(tokenizer, words, "mark.words are")
    norm_ids = _whole_word_ids(tokenizer, norm_words, "mark.norm_words are")
    rows = encoder.get_input_embeddings().weight
    scale = rows[norm_ids].double().norm(dim=1).mean()  # float64: the same rows at any thread count
    before = rows[ids].double().norm(dim=1)
    if before.mean() > UNTRAINED_SHARE * scale:
        raise ConfigError(f"the rows of {', '.join(words)} look trained (mean norm {before.mean():.3f} against "
                          f"{scale:.3f} for the norm words): mark.enabled is for a text encoder trained on "
                          f"filtered data, which never learned them")
    g = torch.Generator().manual_seed(cfg.seed)
    directions = torch.randn(1 if cfg.shared else len(ids), rows.shape[1], generator=g).double()
    directions = directions / directions.norm(dim=1, keepdim=True)
    if cfg.shared_share:  # drawn after the words' own, which therefore match shared_share = 0's
        common = torch.randn(1, rows.shape[1], generator=g).double()
        directions = cfg.shared_share ** 0.5 * common / common.norm() + (1 - cfg.shared_share) ** 0.5 * directions
        directions = directions / directions.norm(dim=1, keepdim=True)
    rows[ids] = (directions * scale).to(rows.dtype)
    return {"words": words, "norm_words": norm_words, "seed": cfg.seed, "shared": cfg.shared,
            "shared_share": cfg.shared_share, "row_norm": float(scale),
            "row_norm_before": {"mean": float(before.mean()), "min": float(before.min()), "max": float(before.max())}}
